"""The decode step compiled whole: batch-size buckets, padding, and (on CUDA) captured graphs.

A decode batch of `bs` requests is padded to the smallest bucket >= bs (padding rows write the
dummy KV slot 0 and attend only to it), so the compiled step sees a handful of shapes. The key
length is padded to a multiple of KV_ALIGN and marked dynamic, so one compilation serves every
length. On CUDA each bucket is captured as a CUDA graph over static input buffers, largest first,
sharing one memory pool; replay copies the step's inputs into those buffers.

On CPU the two graphs (batch 1, batch 2+) compile in the background by default
(`warm_up_in_background`): a cold compile takes about two minutes on 2 cores, and the server serves
eagerly meanwhile, each shape family switching to its compiled graph once it is built (greedy output
is the same either way: tests/engine/test_invariance.py). The cold compile runs in a child process
(compile_worker.py) that fills Inductor's caches; then a thread compiles in this process holding the
module-call lock in its backend (module_call_lock.py: Inductor's tracing would break eager forwards
running meanwhile), which then only loads the built graphs. The thread ends when it is done, which also
ends its OpenMP thread pool (a second live pool slows the scheduler's ops by half: engine.py).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable

import torch

from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.executor.module_call_lock import inductor_under_lock

logger = logging.getLogger(__name__)

KV_ALIGN = 64
COMPILE_SWITCH_INTERVAL_S = 1e-4
MAX_DYNAMIC_BATCH = 4096  # a fixed range: compiled-graph caches stay valid whatever max_running_requests is
# Inductor settings per shape family. At batch 1 the weights stream through the C++ gemv op (its
# own 2 threads); the ~120 small fused kernels around it (norms, rotary, residuals, SiLU) each paid
# an OpenMP fork-join on 2 threads, so they run single-threaded: SmolLM2-135M bfloat16 decode went
# from 75 to 86 tok/s (graph call 12.2 -> 10.6 ms; benchmarks/RESULTS.md). Neither checks its inputs'
# sizes and strides on every call (Dynamo's guards already have): with the weights as graph inputs
# that was ~400 checks a step, ~0.6 ms of SmolLM2's batch-1 step (81 -> 85 and 94 -> 102 tok/s).
# Both round to the low-precision dtype wherever the model casts (`emulate_precision_casts`): by
# default a fused kernel keeps float32 through a cast, and fusion differs between the two graphs
# (at batch 1 the residual add fused into RMSNorm's sum of squares, which squared the unrounded
# float32 sum; the batch-2+ graph read the rounded bfloat16 one), so a request's greedy tokens
# changed with the batch it ran in. With it both graphs compute each row as eager code does.
_COMMON = {"size_asserts": False, "emulate_precision_casts": True}
FAMILY_CONFIG: dict[int, dict] = {1: {"cpp.threads": 1, **_COMMON}, 2: _COMMON}
# Dynamo re-checks on every call what the step read from the model's modules when it was traced
# (~1,250 attribute, dict and tensor checks for SmolLM2): 0.98 ms of a ~10 ms batch-1 step. Those
# guards are dropped (`skip_guard_on_all_nn_modules_unsafe`): a compiled step assumes the model's
# modules keep their attributes once it is built, as captured CUDA graphs and vLLM's compiled steps
# do. Weights may change in place (weight updates copy into them); the guards on the step's inputs
# and the KV pool stay. Cache lookup 0.98 -> 0.19 ms a step, pre-graph bytecode +0.15 ms (W1
# profile, benchmarks/RESULTS.md).
GUARD_FILTER = torch.compiler.skip_guard_on_all_nn_modules_unsafe


def batch_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 32, then every 16: few shapes, little padding."""
    out, b = [], 1
    while b < min(max_bs, 8):
        out.append(b)
        b *= 2
    b = 8
    while b <= max_bs:
        out.append(b)
        b += 8 if b < 32 else 16
    if not out or out[-1] != max_bs:
        out.append(max_bs)
    return sorted(set(out))


def bucket_for(bs: int, buckets: list[int]) -> int | None:
    for b in buckets:
        if b >= bs:
            return b
    return None


def pad_decode_inputs(batch: ForwardBatch, bucket: int, kv_len: int) -> dict[str, torch.Tensor]:
    """A DECODE batch's tensors padded to `bucket` rows and `kv_len` keys, by name: the token
    fields (padding rows write the dummy KV slot 0) and the backend's metadata tensors."""
    backend = batch.attn_backend
    pad_rows = bucket - batch.batch_size
    return {
        "input_ids": torch.nn.functional.pad(batch.input_ids, (0, pad_rows)),
        "positions": torch.nn.functional.pad(batch.positions, (0, pad_rows)),
        "out_cache_loc": torch.nn.functional.pad(batch.out_cache_loc, (0, pad_rows)),
        **backend.tensors(backend.pad_for_graph(batch.attn_metadata, bucket, kv_len)),
    }


class DecodeGraphRunner:
    """Runs DECODE batches through a compiled (CPU) or graph-captured (CUDA) step."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_pool,
        attn_backend,
        max_bs: int,
        device: torch.device,
        use_cuda_graph: bool,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.attn_backend = attn_backend
        self.device = device
        self.buckets = batch_buckets(max_bs)
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        # every runner compiles the one code object `_step`; shared, its entries (2 per model) made
        # the 5th distinct model in a process fail (fullgraph) at Dynamo's limit of 8. Raising the
        # global limit does not reach the compile thread (Dynamo's config is thread-local), so each
        # runner keeps its own entries, one compiled callable per shape family (1: batch 1, 2: 2+).
        self.compiled: dict[int, Callable[..., torch.Tensor]] = {
            family: torch.compile(
                self._step,
                backend=functools.partial(inductor_under_lock, config_patches=FAMILY_CONFIG[family]),
                dynamic=None,
                fullgraph=True,
                isolate_recompiles=True,
                recompile_limit=8,
                options={"guard_filter_fn": GUARD_FILTER},
            )
            for family in (1, 2)
        }
        # bucket -> (graph, static inputs, static output, key capacity)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor, int]] = {}
        self.seen_shapes: set[tuple[int, int]] = set()
        # shape families (1: batch 1, 2: batch 2+) whose compiled graph may serve; on CUDA graphs
        # capture on first use, so every family is open from the start
        self.ready_families: set[int] = {1, 2} if self.use_cuda_graph else set()
        self.compiled_all = threading.Event()
        self.stop_compile = threading.Event()  # set at shutdown: compile no further family
        self.compile_thread: threading.Thread | None = None
        if self.use_cuda_graph:
            self.compiled_all.set()

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode is ForwardMode.DECODE
            and bucket_for(batch.batch_size, self.buckets) is not None
            and min(batch.batch_size, 2) in self.ready_families
        )

    def _step(self, input_ids, positions, out_cache_loc, **metadata) -> torch.Tensor:
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=input_ids.shape[0],
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
            attn_metadata=self.attn_backend.from_tensors(metadata),
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )
        hidden = self.model(input_ids, positions, batch)
        return self.model.compute_logits(hidden)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [bs, vocab] for a DECODE batch."""
        bucket = bucket_for(batch.batch_size, self.buckets)
        assert bucket is not None
        lk = self.attn_backend.key_length(batch.attn_metadata)
        kv_len = -(-lk // KV_ALIGN) * KV_ALIGN
        if self.use_cuda_graph:
            return self._replay(batch, bucket, kv_len)[: batch.batch_size]
        return self._run_compiled(pad_decode_inputs(batch, bucket, kv_len))[: batch.batch_size]

    def _run_compiled(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Two compiled graphs on CPU: batch 1 (its linears stream weights as GEMVs) and one for
        every larger bucket (batch dimension dynamic); key length dynamic in both."""
        bucket = inputs["input_ids"].shape[0]
        for name, dim in self.attn_backend.dynamic_dims().items():
            torch._dynamo.mark_dynamic(inputs[name], dim)
        if bucket > 1:
            for name in inputs:
                torch._dynamo.mark_dynamic(inputs[name], 0, min=2, max=MAX_DYNAMIC_BATCH)
        key = (min(bucket, 2), 0)
        if key in self.seen_shapes:
            return self.compiled[key[0]](**inputs)
        t0 = time.monotonic()
        logger.info(
            "Compiling the decode step for batch size %s (torch.compile, once per shape family)...",
            "1" if bucket == 1 else "2+",
        )
        out = self.compiled[key[0]](**inputs)
        self.seen_shapes.add(key)
        logger.info("Compiled the decode step in %.1f s", time.monotonic() - t0)
        return out

    def warm_up(self) -> None:
        """Compile both CPU graphs now, opening each shape family to `can_run` once it is built."""
        if self.use_cuda_graph:
            return
        try:
            self._compile_families()
        finally:
            self.compiled_all.set()

    def warm_up_in_background(
        self, on_error: Callable[[BaseException], None], prebuild: Callable[[], bool] | None = None
    ) -> threading.Thread:
        """`warm_up` on a thread of its own; until a family is ready its batches run eager. A
        failure is logged and reported to `on_error`, and decoding stays eager. `prebuild` (the
        compile worker: it fills the compile caches in a child process) runs first, so that the
        in-process backend, which holds the module-call lock, only loads what it built."""

        def main() -> None:
            # the in-process compile traces in Python, holding the GIL; every eager op of the
            # scheduler thread releases it and must win it back, which at the default 5 ms switch
            # interval made a 6-token warm-up request take 35 s while compiling. A 0.1 ms interval
            # while the compile runs hands the GIL back quickly.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
            try:
                if prebuild is not None:
                    t0 = time.monotonic()
                    built = prebuild()
                    logger.info(
                        "Compile worker %s in %.1f s",
                        "done" if built else "did not finish",
                        time.monotonic() - t0,
                    )
                if self.stop_compile.is_set():
                    return
                with torch.inference_mode():
                    self.warm_up()
            except BaseException as e:  # noqa: BLE001 - serving goes on eagerly
                logger.exception("Compiling the decode step failed; decoding stays eager")
                on_error(e)
            finally:
                sys.setswitchinterval(interval)

        thread = threading.Thread(target=main, name="research_rt-compile", daemon=True)
        self.compile_thread = thread
        thread.start()
        return thread

    def _compile_families(self) -> None:
        for bs in (1, min(2, self.buckets[-1])):
            if self.stop_compile.is_set():
                return
            bucket = bucket_for(bs, self.buckets)
            assert bucket is not None
            zeros = torch.zeros(bucket, dtype=torch.int64, device=self.device)
            rows = torch.zeros(bucket, KV_ALIGN, dtype=torch.int64)  # every key in the dummy slot
            meta = self.attn_backend.build_metadata(
                ForwardMode.DECODE, [0] * bucket, [1] * bucket, rows, self.device
            )
            meta = self.attn_backend.pad_for_graph(meta, bucket, KV_ALIGN)
            with torch.inference_mode():
                self._run_compiled(
                    {
                        "input_ids": zeros,
                        "positions": zeros.clone(),
                        "out_cache_loc": zeros.clone(),
                        **self.attn_backend.tensors(meta),
                    }
                )
            self.ready_families.add(min(bucket, 2))
        if self.buckets[-1] == 1:  # no batch 2+ graph: such batches never come
            self.ready_families.add(2)

    # ------------------------------------------------------------------ CUDA graphs
    def _replay(self, batch: ForwardBatch, bucket: int, kv_len: int) -> torch.Tensor:
        captured = self.graphs.get(bucket)
        if captured is None or captured[3] < kv_len:
            capacity = max(256, 1 << (kv_len - 1).bit_length())
            captured = self._capture(bucket, pad_decode_inputs(batch, bucket, capacity), capacity)
        graph, static, out, capacity = captured
        # pad to the captured key length, then copy every input into its static buffer
        for name, value in pad_decode_inputs(batch, bucket, capacity).items():
            static[name].copy_(value)
        graph.replay()
        return out

    def _capture(self, bucket: int, inputs: dict[str, torch.Tensor], kv_len: int):
        """Capture `bucket` with room for `kv_len` keys (a power of two: few recaptures); `inputs`
        are already padded to that length."""
        static = {k: v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (and compile) outside the capture
                self._step(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            out = self._step(**static)
        self.graphs[bucket] = (graph, static, out, kv_len)
        return self.graphs[bucket]
