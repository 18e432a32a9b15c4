"""The offline Engine: the same scheduler loop the server runs, driven from Python.

    engine = research_rt.Engine()            # the embedded SmolLM2-135M-Instruct
    out = engine.generate("Hi", {"temperature": 0, "max_new_tokens": 16})
    print(out["text"], out["meta_info"])

The scheduler runs on a background thread; `generate` submits requests and waits for their
outputs (or yields cumulative chunks with `stream=True`). `async_generate` is the asyncio flavour
the HTTP server uses.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch

from research_rt.engine.embedding import NOT_GENERATION
from research_rt.engine.embedding_api import EmbeddingAPIMixin
from research_rt.engine.encoder_scheduler import EncoderScheduler
from research_rt.engine.io_struct import GenerateInput, RequestError
from research_rt.engine.req import Req
from research_rt.engine.scheduler import Control, ReqOutput, Scheduler
from research_rt.engine.tokenizer_front import TokenizerFront, eos_token_ids
from research_rt.executor.encoder_runner import EncoderRunner
from research_rt.executor.model_runner import ModelRunner
from research_rt.loader.model_loader import load_config, load_tokenizer
from research_rt.loader.resolve import resolve_model_path
from research_rt.models.registry import is_embedding_architecture, resolve_model_class
from research_rt.server_args import ServerArgs

logger = logging.getLogger("research_rt.engine")

Event = tuple[int, dict[str, Any], bool]  # (index in the flattened batch, response dict, finished)


class Engine(EmbeddingAPIMixin):
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        args = kwargs.pop("server_args", None) or ServerArgs(model_path=model_path, **kwargs)
        self.server_args = args
        self.source = resolve_model_path(args.model_path)
        self.model_path = args.model_path or self.source.path
        config = load_config(self.source)
        self.tokenizer = (
            None if args.skip_tokenizer_init else load_tokenizer(self.source, args.tokenizer_path)
        )
        architectures = getattr(config, "architectures", None)
        self.is_embedding = bool(args.is_embedding or is_embedding_architecture(architectures))
        self._is_encoder = getattr(resolve_model_class(architectures), "is_encoder", False)
        self.config = config
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
            target=self._scheduler_main,
            args=(config, ready, failure),
            daemon=True,
            name="research_rt-scheduler",
        )
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def _scheduler_main(self, config: Any, ready: threading.Event, failure: list[BaseException]) -> None:
        args = self.server_args
        try:
            with torch.inference_mode():
                self.runner = (EncoderRunner if self._is_encoder else ModelRunner)(args, self.source, config)
            self.context_len = self.runner.context_len
            self.front = TokenizerFront(
                self.tokenizer,
                args,
                config,
                self.context_len,
                self.runner.max_total_num_tokens,
                eos_token_ids(config, self.tokenizer, _generation_eos(self.source)),
            )
            self.scheduler = (
                EncoderScheduler(self.runner, args, self._on_output)
                if self._is_encoder
                else Scheduler(self.runner, self.tokenizer, args, self._on_output)
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor's thread
            failure.append(e)
            ready.set()
            return
        ready.set()
        self.scheduler.run_forever(self._stop)

    # ---------------------------------------------------------------- plumbing
    def _on_output(self, outs: list[ReqOutput]) -> None:
        for out in outs:
            with self._sinks_lock:
                sink = self._sinks.pop(out.req.rid, None) if out.finished else self._sinks.get(out.req.rid)
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
            self.scheduler.inbox.put(r)

    def _start(self, obj: GenerateInput, sink: Callable[[ReqOutput], None]) -> tuple[list[Req], bool]:
        """Validate `obj` and start its requests; n > 1 first prefills each prompt once (cache)."""
        if self.is_embedding:
            raise RequestError(NOT_GENERATION)
        groups, single = self.front.make_reqs(obj)
        flat = [r for g in groups for r in g]
        if any(len(g) > 1 for g in groups) and not self.server_args.disable_radix_cache:
            warm = [
                self.front.make_reqs(
                    GenerateInput(input_ids=g[0].input_ids, sampling_params={"max_new_tokens": 0})
                )[0][0][0]
                for g in groups
                if len(g) > 1
            ]
            pending = {r.rid for r in warm}
            lock = threading.Lock()

            def warm_sink(out: ReqOutput) -> None:
                with lock:
                    pending.discard(out.req.rid)
                    done = not pending
                if done:
                    self._submit(flat, sink)

            self._submit(warm, warm_sink)
        else:
            self._submit(flat, sink)
        return flat, single and len(flat) == 1

    def call_in_scheduler(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` on the scheduler thread between steps; return its result (or raise its error)."""
        ctl = Control("call", fn=fn)
        self.scheduler.inbox.put(ctl)
        if not ctl.done.wait(timeout):
            raise TimeoutError("scheduler did not answer")
        if isinstance(ctl.result, Exception):
            raise ctl.result
        return ctl.result

    # ---------------------------------------------------------------- public API
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
        events: queue.Queue[ReqOutput] = queue.Queue()
        reqs, single = self._start(obj, events.put)
        it = self._collect(reqs, single, obj, events.get)
        if stream:
            return (resp for _, resp, _ in it)
        final: dict[int, dict[str, Any]] = {}
        for index, resp, finished in it:
            if finished:
                final[index] = resp
        results = [final[i] for i in range(len(reqs))]
        return results[0] if single else results

    async def async_generate(
        self, obj: GenerateInput, stream_incremental_ids: bool = False
    ) -> AsyncIterator[Event]:
        """Yield (index, response, finished) as outputs arrive; aborts its requests if cancelled."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ReqOutput] = asyncio.Queue()
        reqs, single = self._start(obj, lambda out: loop.call_soon_threadsafe(events.put_nowait, out))
        remaining = {r.rid for r in reqs}
        try:
            index_of = {r.rid: i for i, r in enumerate(reqs)}
            sent = dict.fromkeys(index_of, 0)
            while remaining:
                out = await events.get()
                if _skippable(out, obj, sent):
                    continue
                i = index_of[out.req.rid]
                resp = self.front.response(
                    out.req,
                    out.text,
                    obj.return_text_in_logprobs,
                    sent[out.req.rid] if stream_incremental_ids else 0,
                    upto=out.num_output_ids,
                )
                sent[out.req.rid] = out.num_output_ids
                if out.finished:
                    remaining.discard(out.req.rid)
                yield i, resp, out.finished
        finally:
            for rid in remaining:
                self.abort_request(rid)

    def _collect(
        self, reqs: list[Req], single: bool, obj: GenerateInput, get: Callable[[], ReqOutput]
    ) -> Iterator[Event]:
        index_of = {r.rid: i for i, r in enumerate(reqs)}
        remaining = set(index_of)
        seen = dict.fromkeys(index_of, 0)
        while remaining:
            out = get()
            if _skippable(out, obj, seen):
                continue
            seen[out.req.rid] = out.num_output_ids
            if out.finished:
                remaining.discard(out.req.rid)
            resp = self.front.response(
                out.req, out.text, obj.return_text_in_logprobs, upto=out.num_output_ids
            )
            if not single:
                resp["index"] = index_of[out.req.rid]
            yield index_of[out.req.rid], resp, out.finished

    def abort_request(self, rid: str | None = None) -> None:
        """Abort one request (or all with rid=None); its KV slots are freed at the next step."""
        self.scheduler.inbox.put(Control("abort" if rid else "abort_all", rid=rid))

    def flush_cache(self) -> bool:
        ctl = Control("flush_cache")
        self.scheduler.inbox.put(ctl)
        ctl.done.wait()
        return bool(ctl.result)

    def check_pool_integrity(self) -> None:
        """Assert no KV slot is lost; waits until the scheduler is idle."""
        self.call_in_scheduler(
            lambda: self.scheduler.tree.check_integrity(expect_idle=self.scheduler.is_idle())
        )

    def get_load(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "num_running_reqs": len(s.running),
            "num_waiting_reqs": len(s.waiting),
            "num_used_tokens": s.kv_pool.size - s.kv_pool.available_size() - s.tree.evictable_size,
            "num_cached_tokens": s.tree.evictable_size + s.tree.protected_size,
            "num_free_tokens": s.kv_pool.available_size(),
        }

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _skippable(out: ReqOutput, obj: GenerateInput, reported: dict[str, int]) -> bool:
    """A non-streaming caller needs only the first token (time to first token) and the final
    state: skip building a response for every step in between."""
    return not obj.stream and not out.finished and reported[out.req.rid] > 0


def _generation_eos(source) -> Any:
    if source.is_gguf:
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(source.directory)).eos_token_id
    except Exception:  # noqa: BLE001 - generation_config.json is optional
        return None
