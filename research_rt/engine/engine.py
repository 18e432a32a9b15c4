"""The Engine: the one API over the runtime, for Python callers and for the HTTP server alike.

    engine = research_rt.Engine()            # the embedded SmolLM2-135M-Instruct
    out = engine.generate("Hi", {"temperature": 0, "max_new_tokens": 16})
    print(out["text"], out["meta_info"])

The scheduler runs on a background thread; `generate` submits requests and waits for their
outputs (or yields cumulative chunks with `stream=True`). `async_generate` and `async_encode` are
the asyncio flavours the server uses; `abort_request`, `flush_cache`, `update_weights_from_disk`,
the expert-distribution recorder, profiling and `stats` complete what the server needs. The mixins
add `tokenize` / `detokenize` (tokenize.py), `score` (score.py) and the RL refit API: pause and
continue, updates from tensors, `weight_version`, the weights checker (refit.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from research_rt.core.errors import RequestError
from research_rt.core.messages import AbortReq, AddReq, CallInScheduler, FlushCache, ReqOutput
from research_rt.core.req import Req
from research_rt.engine.collector import GenerateEvent, OutputCollector
from research_rt.engine.encode import EncodeMixin
from research_rt.engine.instruments import InstrumentsMixin
from research_rt.engine.profiler import SchedulerProfiler
from research_rt.engine.refit import RefitMixin
from research_rt.engine.score import ScoreMixin
from research_rt.engine.tokenize import TokenizeMixin
from research_rt.engine.weights import update_weights_on_scheduler
from research_rt.executor.tp_runner import runner_class
from research_rt.frontend.embedding_input import NOT_GENERATION
from research_rt.frontend.generate_input import GenerateInput
from research_rt.frontend.request_builder import RequestBuilder, eos_token_ids
from research_rt.frontend.response import generate_response
from research_rt.loader.model_loader import generation_eos, load_config, load_tokenizer
from research_rt.loader.resolve import resolve_model_path
from research_rt.models.registry import is_embedding_architecture, resolve_model_class
from research_rt.scheduler.encoder_scheduler import EncoderScheduler
from research_rt.scheduler.scheduler import Scheduler
from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.engine")


class Engine(EncodeMixin, InstrumentsMixin, TokenizeMixin, ScoreMixin, RefitMixin):
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        args = kwargs.pop("server_args", None) or ServerArgs(model_path=model_path, **kwargs)
        args = args.resolved()
        args.warn_ignored_flags()
        self.server_args = args
        self.weight_version = args.weight_version  # in every response's meta_info (refit.py)
        self.source = resolve_model_path(args.model_path)
        self.model_path = args.model_path or self.source.path
        self.config = load_config(self.source)
        self.tokenizer = (
            None if args.skip_tokenizer_init else load_tokenizer(self.source, args.tokenizer_path)
        )
        architectures = getattr(self.config, "architectures", None)
        self.is_embedding = bool(args.is_embedding or is_embedding_architecture(architectures))
        self._is_encoder = getattr(resolve_model_class(architectures), "is_encoder", False)
        self._sinks: dict[str, Callable[[ReqOutput], None]] = {}
        self._sinks_lock = threading.Lock()
        self._stop = threading.Event()
        # The model is built, compiled and run on one thread, the scheduler's: libgomp throttles its
        # spin-waits once more OpenMP threads exist than cores, so a second thread that ever ran a
        # parallel torch op (the caller's) would slow every op of the scheduler by half (measured:
        # 37 vs 81 tok/s single-stream on 2 cores). The caller only tokenizes and waits.
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._scheduler_main, args=(ready, failure), daemon=True, name="research_rt-scheduler"
        )
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def _scheduler_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        args = self.server_args
        try:
            with torch.inference_mode():
                self.runner = runner_class(self._is_encoder, args.tp_size)(args, self.source, self.config)
            self.context_len = self.runner.context_len
            self.max_total_num_tokens = self.runner.max_total_num_tokens
            self.max_running_requests = self.runner.max_running_requests
            stop_ids = eos_token_ids(self.config, self.tokenizer, generation_eos(self.source))
            shape = getattr(self.runner, "intervention_shape", None)  # what interventions may address
            self.builder = RequestBuilder(
                self.tokenizer,
                args,
                self.config,
                self.context_len,
                self.max_total_num_tokens,
                stop_ids,
                shape,
            )
            self.max_req_input_len = self.builder.max_req_input_len
            self.vocab_size = self.builder.vocab_size
            self.scheduler = (
                EncoderScheduler(self.runner, args, self._on_output)
                if self._is_encoder
                else Scheduler(self.runner, self.tokenizer, args, self._on_output)
            )
            self.profiler = SchedulerProfiler()
            self.scheduler.step_hooks.append(self.profiler.on_step)
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor's thread
            failure.append(e)
            ready.set()
            return
        ready.set()
        start_compile = getattr(self.runner, "start_background_compile", None)
        if start_compile is not None:
            start_compile()
        self.scheduler.run_forever(self._stop)

    # ---------------------------------------------------------------- plumbing
    def _on_output(self, outs: list[ReqOutput]) -> None:
        for out in outs:
            with self._sinks_lock:
                sink = self._sinks.pop(out.rid, None) if out.finished else self._sinks.get(out.rid)
            if sink is not None:
                sink(out)

    def _submit(self, reqs: list[Req], sink: Callable[[ReqOutput], None]) -> None:
        with self._sinks_lock:
            dup = next((r.rid for r in reqs if r.rid in self._sinks), None)
            if dup is not None:
                raise RequestError(f"Duplicate request id {dup!r}: a request with this rid is still running.")
            for r in reqs:
                self._sinks[r.rid] = sink
        for r in reqs:
            self.scheduler.inbox.put(AddReq(r))

    def _start(self, obj: GenerateInput, loop: asyncio.AbstractEventLoop | None) -> OutputCollector:
        """Validate `obj` and start its requests; n > 1 first prefills each prompt once (cache)."""
        if self.is_embedding:
            raise RequestError(NOT_GENERATION)
        groups = self.builder.make_reqs(obj)
        flat = [r for g in groups for r in g]
        collector = OutputCollector([r.rid for r in flat], loop)
        shared = [g[0].input_ids for g in groups if len(g) > 1]
        if not shared or self.server_args.disable_radix_cache:
            self._submit(flat, collector.put)
        else:
            self._submit_after_prefill(shared, flat, collector.put)
        return collector

    def _submit_after_prefill(
        self, prefixes: list[list[int]], reqs: list[Req], sink: Callable[[ReqOutput], None]
    ) -> None:
        """Prefill each of `prefixes` alone (into the prefix cache), then submit `reqs`: the n
        samples of a prompt, or the items of a score query, then share those prefixes' KV."""
        only = [GenerateInput(input_ids=ids, sampling_params={"max_new_tokens": 0}) for ids in prefixes]
        warm = [r for obj in only for r in self.builder.make_reqs(obj)[0]]
        pending, lock = {r.rid for r in warm}, threading.Lock()

        def warmed(out: ReqOutput) -> None:
            if not out.finished:
                return
            with lock:
                last = out.rid in pending and len(pending) == 1
                pending.discard(out.rid)
            if last:
                self._submit(reqs, sink)

        self._submit(warm, warmed)

    def call_in_scheduler(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` on the scheduler thread between steps; return its result (or raise its error)."""
        msg = CallInScheduler(fn)
        self.scheduler.inbox.put(msg)
        return msg.reply.result(timeout)

    # ---------------------------------------------------------------- generate
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Same inputs and outputs as `/generate` (a dict, a list for a batch, or an iterator of
        cumulative chunks with `stream=True`)."""
        obj = GenerateInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob,
            stream=stream,
            **kwargs,
        )
        collector = self._start(obj, None)
        single = obj.single_response

        def events() -> Iterator[dict[str, Any]]:
            try:
                for index, out in collector:
                    resp = generate_response(
                        out, self.tokenizer, obj.return_text_in_logprobs, weight_version=self.weight_version
                    )
                    if not single:
                        resp["index"] = index
                    yield resp
            finally:
                self._abort_remaining(collector)

        if stream:
            return events()
        results = [r for r in events() if r["meta_info"]["finish_reason"] is not None]
        results.sort(key=lambda r: r.get("index", 0))
        return results[0] if single else results

    async def async_generate(
        self, obj: GenerateInput, stream_incremental_ids: bool = False
    ) -> AsyncIterator[GenerateEvent]:
        """Yield a `GenerateEvent` as outputs arrive; aborts the call's requests if cancelled.
        With `stream_incremental_ids`, each response's `output_ids` holds only the new tokens."""
        collector = self._start(obj, asyncio.get_running_loop())
        sent: dict[int, int] = {}
        try:
            async for index, out in collector:
                ids_from = sent.get(index, 0) if stream_incremental_ids else 0
                sent[index] = out.completion_tokens
                resp = generate_response(
                    out, self.tokenizer, obj.return_text_in_logprobs, ids_from, self.weight_version
                )
                yield GenerateEvent(index, resp, out.finished, out.error)
        finally:
            self._abort_remaining(collector)

    def _abort_remaining(self, collector: OutputCollector) -> None:
        for rid in collector.remaining:
            self.abort_request(rid)

    # ---------------------------------------------------------------- control
    def abort_request(self, rid: str | None = None) -> None:
        """Abort one request (or all with rid=None); its KV slots are freed at the next step."""
        self.scheduler.inbox.put(AbortReq(rid))

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests are queued or running."""
        msg = FlushCache()
        self.scheduler.inbox.put(msg)
        return bool(msg.reply.result())

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> tuple[bool, str]:
        """Load new weights into the running model (rolled back on failure); (success, message)."""
        fmt = load_format or self.server_args.load_format
        ok, message, source = self.call_in_scheduler(
            lambda: update_weights_on_scheduler(self, model_path, fmt)
        )
        if ok:
            self.source, self.model_path = source, model_path
        return ok, message

    # ---------------------------------------------------------------- lifetime
    def shutdown(self, wait_for_compile: bool = True) -> None:
        """Stop the scheduler and the runner. A background compile stops before its next shape
        family; `wait_for_compile` (the default) waits for the one in progress, so no thread of
        this Engine outlives the call (the server passes False and exits at once instead)."""
        self._stop.set()
        self._thread.join(timeout=10)
        close = getattr(getattr(self, "runner", None), "close", None)  # tp > 1: stop the other ranks
        if close is not None:
            close(wait_for_compile=wait_for_compile)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
