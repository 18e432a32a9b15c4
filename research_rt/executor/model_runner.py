"""ModelRunner: the model, its KV storage, and one forward step from a list of requests.

The scheduler decides *which* tokens run; the runner turns that into a ForwardBatch (flat token
ids, positions, KV slots, attention metadata), runs the model (eager, or the compiled decode step),
and returns logits for the rows the scheduler asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool
from research_rt.core.forward_batch import ForwardBatch, ForwardMode
from research_rt.core.quant_config import WeightOnlyConfig
from research_rt.core.req import Req
from research_rt.distributed.group import TPInfo
from research_rt.executor.attention import create_backend
from research_rt.executor.compile_process import compile_in_child
from research_rt.executor.expert_distribution import ExpertDistributionRecorder
from research_rt.executor.graph_runner import DecodeGraphRunner
from research_rt.executor.interventions import Segment, build_interventions, collect_captures
from research_rt.loader.model_loader import context_length, load_model
from research_rt.loader.resolve import ModelSource
from research_rt.loader.tp_sharding import TPPlan
from research_rt.models.layers.quant import quantize_model
from research_rt.server_args import ServerArgs

logger = logging.getLogger(__name__)

CPU_MAX_POOL_TOKENS = 1 << 18
CPU_KV_CAP_BYTES = 3 << 29  # 1.5 GiB: zeroing more costs seconds at start-up on CPU


@dataclass
class StepInput:
    """One request's share of a step: tokens fill_ids[start:start+length] at those positions."""

    req: Req
    start: int
    length: int


class ModelRunner:
    """One process's model and KV pool; at tp > 1 rank `tp_rank`'s shard of both (tp_runner.py)."""

    def __init__(self, args: ServerArgs, source: ModelSource, config: Any, tp_rank: int = 0) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.context_len = context_length(config, args.context_length)
        tp = TPInfo(tp_rank, args.tp_size)
        self.plan = TPPlan(config, tp) if tp.size > 1 else None
        loaded = load_model(source, args.dtype, args.device, args.load_format, config=config, plan=self.plan)
        self.model, self.config, self.dtype = loaded.model, loaded.config, loaded.dtype
        self.weight_quant = WeightOnlyConfig.parse(args.torchao_config)
        self._quantize()
        shape_of = getattr(self.model, "intervention_shape", None)
        self.intervention_shape = shape_of() if shape_of is not None else None  # None: not supported
        spec = self.model.kv_spec()
        self.num_layers, self.kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.max_total_num_tokens = self._pool_size()
        self.kv_pool = KVPool(
            self.max_total_num_tokens, self.num_layers, self.kv_heads, self.head_dim, self.dtype, self.device
        )
        max_reqs = args.max_running_requests or max(1, min(self.max_total_num_tokens // 2, 256))
        self.max_running_requests = max_reqs
        self.req_to_token = ReqToTokenPool(max_reqs, self.context_len, self.device)
        self.attn_backend = create_backend(args.attention_backend)
        self.graph_runner: DecodeGraphRunner | None = None
        self.expert_recorder = _make_expert_recorder(self.model)
        self.start_ranks()  # tp > 1: the ranks meet here, before the first (warm-up) forward
        # MoE layers dispatch without host sync while captured (moe.select_dispatch); recording
        # batches run eager (forward), so MoE models are captured too
        use_graphs = self.device.type == "cuda" and not args.disable_cuda_graph
        if args.enable_torch_compile or use_graphs:
            max_bs = min(
                (args.cuda_graph_max_bs if use_graphs else args.torch_compile_max_bs) or max_reqs, max_reqs
            )
            self.graph_runner = DecodeGraphRunner(
                self.model, self.kv_pool, self.attn_backend, max_bs, self.device, use_cuda_graph=use_graphs
            )
            if args.disable_background_compile:
                self.graph_runner.warm_up()
        logger.info(
            "KV cache pool: %d tokens, %.1f MB (%s)",
            self.max_total_num_tokens,
            self.max_total_num_tokens * self.kv_pool.bytes_per_token() / 1e6,
            self.dtype,
        )

    def start_background_compile(self) -> None:
        """Compile the decode step on a thread of its own while batches run eager (graph_runner.py);
        a no-op when it is compiled already or compile is off."""
        gr = self.graph_runner
        if gr is None or gr.compiled_all.is_set():
            return
        logger.info("Compiling the decode step in the background; decode batches run eager until it is ready")
        prebuild = None
        if type(self.model).__module__.startswith("research_rt."):  # a child can build it too
            pool, reqs = self.max_total_num_tokens, self.max_running_requests
            prebuild = lambda: compile_in_child(self.args, pool, reqs, gr.stop_compile)  # noqa: E731
        else:  # a researcher's class, registered in this process only: serving waits for the compile
            logger.info("%s is not a research_rt model: compiling in this process", type(self.model).__name__)
        gr.warm_up_in_background(on_error=lambda e: None, prebuild=prebuild)

    def close(self, wait_for_compile: bool = True) -> None:
        """At shutdown: a background compile stops before its next shape family (the compile
        worker is killed; a family already compiling in this process runs to its end: it cannot
        be interrupted), and with `wait_for_compile` its thread is joined, so that no thread of
        this runner outlives it (one left importing and tracing raced the caller's own code)."""
        gr = self.graph_runner
        if gr is None:
            return
        gr.stop_compile.set()
        if wait_for_compile and gr.compile_thread is not None:
            gr.compile_thread.join()

    def start_ranks(self) -> None:
        """Nothing at tp 1 (tp_runner.py starts or joins the other ranks)."""

    def _quantize(self) -> None:
        if self.weight_quant is None:
            return
        n = quantize_model(self.model, self.weight_quant)
        logger.info("Weight-only quantization %s: %d linear layers packed", self.args.torchao_config, n)

    def _pool_size(self) -> int:
        bytes_per_token = (
            2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        )
        if self.args.max_total_tokens:
            return int(self.args.max_total_tokens)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            frac = self.args.mem_fraction_static or 0.88
            budget = free * frac - torch.cuda.memory_allocated(self.device) * (1 - frac)
        else:
            available = psutil.virtual_memory().available
            budget = (
                available * self.args.mem_fraction_static
                if self.args.mem_fraction_static
                else min(available * 0.25, CPU_KV_CAP_BYTES)
            )
        return max(
            min(
                int(budget // bytes_per_token), CPU_MAX_POOL_TOKENS if self.device.type == "cpu" else 1 << 40
            ),
            256,
        )

    # ------------------------------------------------------------------ steps
    def make_batch(
        self,
        mode: ForwardMode,
        items: list[StepInput],
        out_cache_loc: torch.Tensor,
        decode_items: list[StepInput] | None = None,
    ) -> ForwardBatch:
        """The ForwardBatch for `items` (their KV slots in `out_cache_loc`). `decode_items` (EXTEND
        only: a mixed chunk) are one-token decodes appended after the extend tokens; their slots are
        already in their request rows at position `start`. Requests with interventions put their
        per-row tensors in `batch.interventions`."""
        if decode_items:
            batch = self.make_batch(mode, items, out_cache_loc)
            dec_loc = torch.stack(
                [self.req_to_token.table[it.req.req_pool_row, it.start] for it in decode_items]
            )
            decode = self.make_batch(ForwardMode.DECODE, decode_items, dec_loc)
            batch.input_ids = torch.cat([batch.input_ids, decode.input_ids])
            batch.positions = torch.cat([batch.positions, decode.positions])
            batch.out_cache_loc = torch.cat([batch.out_cache_loc, decode.out_cache_loc])
            batch.mixed_decode = decode
            batch.interventions = self._interventions([*items, *decode_items])
            return batch
        if mode is ForwardMode.DECODE:  # the one new token is the last of fill_ids
            ids = [(it.req.output_ids or it.req.input_ids)[-1] for it in items]
        else:
            ids = [t for it in items for t in it.req.fill_ids[it.start : it.start + it.length]]
        batch = self.make_rows_batch(
            mode,
            [it.req.req_pool_row for it in items],
            [it.start for it in items],
            [it.length for it in items],
            ids,
            out_cache_loc,
        )
        batch.interventions = self._interventions(items)
        if self.expert_recorder and self.expert_recorder.recording:
            batch.expert_recorder = self.expert_recorder
        return batch

    def make_rows_batch(
        self,
        mode: ForwardMode,
        pool_rows: list[int],
        starts: list[int],
        lengths: list[int],
        ids: list[int],
        out_cache_loc: torch.Tensor,
    ) -> ForwardBatch:
        """The ForwardBatch of `lengths[i]` tokens (flat in `ids`) for req_to_token row
        `pool_rows[i]` from position `starts[i]`; each token sees its row's keys up to its own
        position. In DECODE several rows may share a request row: a speculative verify runs a
        request's last token and its drafts as rows at successive positions (speculative/verify.py)."""
        positions = [p for start, n in zip(starts, lengths) for p in range(start, start + n)]
        rows = torch.tensor(pool_rows, dtype=torch.int64)
        max_len = max(start + n for start, n in zip(starts, lengths))
        metadata = self.attn_backend.build_metadata(
            mode, starts, lengths, self.req_to_token.table[rows, :max_len], self.device
        )
        return ForwardBatch(
            mode=mode,
            batch_size=len(pool_rows),
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            out_cache_loc=out_cache_loc.to(self.device),
            attn_metadata=metadata,
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, logit_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return (logits for `logit_rows` of the flat tokens, their hidden states).

        DECODE batches go through the compiled / graph-captured step when one exists (hidden states
        are then not returned); a batch with interventions runs eager, and what its requests
        capture goes to their stores."""
        if self.runs_compiled(batch):
            return _select_rows(self.graph_runner.run(batch), logit_rows).float().cpu(), None
        hidden = self.model(batch.input_ids, batch.positions, batch)
        if batch.interventions is not None:
            collect_captures(batch.interventions, hidden, self.model)
        selected = hidden[logit_rows.to(hidden.device)]
        return self.model.compute_logits(selected).cpu(), selected

    def runs_compiled(self, batch: ForwardBatch) -> bool:
        """Whether `forward` takes the compiled / graph-captured step for `batch`."""
        return (
            self.graph_runner is not None
            and batch.interventions is None
            and batch.expert_recorder is None  # recording runs eager so the layers see the recorder
            and self.graph_runner.can_run(batch)
        )

    def _interventions(self, items: list[StepInput]):
        segments, row = [], 0
        for it in items:
            if it.req.interventions is not None:
                segments.append(Segment(it.req.interventions, it.req.captured, row, it.start, it.length))
            row += it.length
        if not segments:
            return None
        return build_interventions(segments, self.intervention_shape, self.device, self.dtype)

    def pool(self, hidden: torch.Tensor) -> list[float]:
        """An embedding request's output from its last token's final hidden state: the model's own
        `pool` (a classification / reward score head), else the L2-normalized hidden state."""
        pool = getattr(self.model, "pool", None)
        if pool is not None:
            return pool(hidden).float().cpu().tolist()
        return torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().tolist()

    # ------------------------------------------------------------------ weights
    def update_weights(self, source: ModelSource, load_format: str) -> None:
        """Load a checkpoint into the existing parameters (storage kept)."""
        from research_rt.loader.model_loader import load_weights_into

        with torch.inference_mode():
            load_weights_into(self.model, source, load_format, progress=False, plan=self.plan)
            self._quantize()

    def update_weights_from_tensors(
        self, named: list[tuple[str, torch.Tensor]], direct: bool = False
    ) -> None:
        """Copy named tensors into the existing parameters (loader's `copy_named_tensors`)."""
        from research_rt.loader.model_loader import copy_named_tensors

        with torch.inference_mode():
            copy_named_tensors(self.model, named, direct, plan=self.plan)
            self._quantize()


def _make_expert_recorder(model: torch.nn.Module) -> ExpertDistributionRecorder | None:
    layer_ids = getattr(model, "moe_layer_ids", None)
    return ExpertDistributionRecorder(layer_ids, model.num_experts) if layer_ids else None


def _select_rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits[rows]; a decode step asks for every row in order, and gathering batch 64's [64, 49152]
    float32 logits cost 2.9 ms of its ~80 ms step (SmolLM2, Xeon VM, 2026-12-06): skip the copy."""
    if rows.numel() == logits.shape[0] and bool((rows.cpu() == torch.arange(rows.numel())).all()):
        return logits
    return logits[rows.to(logits.device)]
