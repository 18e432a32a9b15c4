"""Mixed load with disconnects against a research_rt (or SGLang) server, loopback only.

    .venv/bin/python -m benchmarks.bench_load --base-url http://127.0.0.1:30000 --num-requests 1000

Requests mix native `/generate` and `/v1/chat/completions`, streaming and not, n=1 and n=2, greedy
with `ignore_eos` (so every finished answer has a known length); a fraction of the streaming clients
hang up after their first few events. Each finished answer is checked for its shape (finish reason,
token counts, one choice per sample, a complete SSE stream ending in [DONE]); afterwards the server
must be idle with its KV pool whole. Prints counts by status, malformed answers, disconnects, and
end-to-end latency p50 / p99 of the finished requests. Without --base-url it launches
`python -m research_rt.launch_server` (the default model) itself on a free port.

`run_load` is also what tests/server/test_load.py runs, smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TOPICS = ["rivers", "dragons", "prime numbers", "the moon", "bread", "chess", "volcanoes", "jazz"]


@dataclass
class Spec:
    index: int
    chat: bool
    stream: bool
    n: int
    new_tokens: int
    disconnect_after: int | None  # events to read before hanging up (streams only)
    prompt: str


@dataclass
class LoadResult:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    malformed: list[str] = field(default_factory=list)
    disconnected: int = 0
    finished: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    idle_after: float = 0.0  # seconds from the last answer until the server was idle
    pool_whole: bool | None = None

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")

        return {
            "requests": sum(self.statuses.values()) + self.disconnected,
            "finished": self.finished,
            "disconnected": self.disconnected,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors_5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "malformed": len(self.malformed),
            "e2e_p50_s": pct(50),
            "e2e_p99_s": pct(99),
            "elapsed_s": self.elapsed,
            "idle_after_s": self.idle_after,
            "requests_per_s": (self.finished + self.disconnected) / self.elapsed if self.elapsed else 0.0,
            "kv_pool_whole": self.pool_whole,
        }


def make_specs(
    num: int, disconnect_frac: float, max_new_tokens: int, seed: int, hangup_tokens: int | None = None
) -> list[Spec]:
    """A deterministic mix; `disconnect_frac` of *all* requests are streams that hang up early. Those
    ask for `hangup_tokens` (default 8 x max_new_tokens): long, so a server that failed to abort them
    would stay busy long after the load."""
    hangup_tokens = hangup_tokens or 8 * max_new_tokens
    rng = random.Random(seed)
    specs = []
    for i in range(num):
        stream = rng.random() < 0.5
        disconnect = stream and rng.random() < min(1.0, 2 * disconnect_frac)
        specs.append(
            Spec(
                index=i,
                chat=rng.random() < 0.5,
                stream=stream,
                n=2 if rng.random() < 0.25 else 1,
                new_tokens=hangup_tokens
                if disconnect
                else rng.randint(max(1, max_new_tokens // 4), max_new_tokens),
                disconnect_after=rng.randint(1, 3) if disconnect else None,
                prompt=f"Client {i} asks: tell me about {rng.choice(TOPICS)}",
            )
        )
    return specs


def _body(spec: Spec) -> tuple[str, dict[str, Any]]:
    if spec.chat:
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": spec.prompt}],
            "max_tokens": spec.new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "n": spec.n,
            "stream": spec.stream,
        }
    return "/generate", {
        "text": spec.prompt,
        "sampling_params": {
            "temperature": 0,
            "max_new_tokens": spec.new_tokens,
            "ignore_eos": True,
            "n": spec.n,
        },
        "stream": spec.stream,
    }


def check_native(spec: Spec, out: Any) -> str | None:
    """None if a finished /generate answer is well formed, else what is wrong."""
    items = out if isinstance(out, list) else [out]
    if len(items) != spec.n or (spec.n == 1) != isinstance(out, dict):
        return f"{len(items)} answers for n={spec.n}"
    for item in items:
        meta = item["meta_info"]
        if meta["finish_reason"] != {"type": "length", "length": spec.new_tokens}:
            return f"finish_reason {meta['finish_reason']}"
        if len(item["output_ids"]) != spec.new_tokens or meta["completion_tokens"] != spec.new_tokens:
            return f"{len(item['output_ids'])} output ids, {meta['completion_tokens']} completion tokens"
        if not isinstance(item["text"], str):
            return "no text"
    return None


def check_native_stream(spec: Spec, events: list[dict[str, Any]]) -> str | None:
    last: dict[int, dict[str, Any]] = {}
    for e in events:
        last[e.get("index", 0)] = e
    if sorted(last) != list(range(spec.n)):
        return f"stream indexes {sorted(last)} for n={spec.n}"
    return check_native(spec, last[0] if spec.n == 1 else [last[i] for i in range(spec.n)])


def check_chat(spec: Spec, out: dict[str, Any]) -> str | None:
    choices = out["choices"]
    if [c["index"] for c in choices] != list(range(spec.n)):
        return f"choice indexes {[c['index'] for c in choices]} for n={spec.n}"
    if any(c["finish_reason"] != "length" or not isinstance(c["message"]["content"], str) for c in choices):
        return "a choice without finish_reason length or content"
    if out["usage"]["completion_tokens"] != spec.n * spec.new_tokens:
        return f"usage.completion_tokens {out['usage']['completion_tokens']}"
    return None


def check_chat_stream(spec: Spec, events: list[dict[str, Any]]) -> str | None:
    seen: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        for c in e["choices"]:
            seen[c["index"]].append(c)
    if sorted(seen) != list(range(spec.n)):
        return f"stream indexes {sorted(seen)} for n={spec.n}"
    for chunks in seen.values():
        if chunks[0]["delta"].get("role") != "assistant":
            return "the first chunk has no assistant role"
        if chunks[-1]["finish_reason"] != "length" or any(c["finish_reason"] for c in chunks[:-1]):
            return "finish_reason not only on the last chunk"
    return None


async def one(session: aiohttp.ClientSession, base: str, spec: Spec, result: LoadResult) -> None:
    path, body = _body(spec)
    t0 = time.perf_counter()
    try:
        async with session.post(base + path, json=body) as resp:
            if resp.status != 200 or not spec.stream:
                text = await resp.text()
                result.statuses[resp.status] += 1
                if resp.status != 200:
                    result.malformed.append(f"#{spec.index} {path}: HTTP {resp.status} {text[:200]}")
                    return
                out = json.loads(text)
                problem = check_chat(spec, out) if spec.chat else check_native(spec, out)
            else:
                events, done = [], False
                async for raw in resp.content:
                    line = raw.strip()
                    if not line:
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise AssertionError(f"error event {event['error']}")
                    events.append(event)
                    if spec.disconnect_after is not None and len(events) >= spec.disconnect_after:
                        resp.close()  # hang up mid-stream: the server must abort and free the request
                        result.disconnected += 1
                        return
                result.statuses[resp.status] += 1
                if not done:
                    problem = "stream ended without [DONE]"
                else:
                    problem = (
                        check_chat_stream(spec, events) if spec.chat else check_native_stream(spec, events)
                    )
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        result.malformed.append(f"#{spec.index} {path}: {type(e).__name__}: {e}")
        return
    if problem is not None:
        result.malformed.append(f"#{spec.index} {path} (stream={spec.stream}, n={spec.n}): {problem}")
        return
    result.finished += 1
    result.latencies.append(time.perf_counter() - t0)


async def _pool_whole(session: aiohttp.ClientSession, base: str, timeout: float) -> bool | None:
    """The server's pool check once it is idle (disconnected requests are aborted at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(base + "/get_server_info") as resp:
            info = await resp.json()
        if (info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0) or time.monotonic() > deadline:
            return info.get("kv_pool_whole")
        await asyncio.sleep(0.05)


async def run_load(
    base: str,
    num_requests: int,
    concurrency: int,
    disconnect_frac: float,
    max_new_tokens: int = 16,
    seed: int = 0,
    timeout: float = 600.0,
    hangup_tokens: int | None = None,
) -> LoadResult:
    specs = make_specs(num_requests, disconnect_frac, max_new_tokens, seed, hangup_tokens)
    result = LoadResult()
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    # force_close: a hang-up really closes the connection (no keep-alive reuse hides it)
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def worker() -> None:
            while not queue.empty():
                await one(session, base, queue.get_nowait(), result)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - t0
        result.pool_whole = await _pool_whole(session, base, timeout=60)
        result.idle_after = time.perf_counter() - t0 - result.elapsed
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-frac", type=float, default=0.12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default="", help="extra launch flags, e.g. --disable-torch-compile")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    proc = None
    url = args.base_url
    if url is None:
        import sys

        from research_rt.utils import launch_server_cmd, wait_for_server

        cmd = f"{sys.executable} -m research_rt.launch_server --host 127.0.0.1 --disable-background-compile {args.server_args}"
        proc, port = launch_server_cmd(cmd, host="127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, timeout=900)
    try:
        result = asyncio.run(
            run_load(
                url, args.num_requests, args.concurrency, args.disconnect_frac, args.max_new_tokens, args.seed
            )
        )
    finally:
        if proc is not None:
            from research_rt.utils import terminate_process

            terminate_process(proc)
    summary = result.summary()
    for k, v in summary.items():
        print(f"{k:20s} {v:.3f}" if isinstance(v, float) else f"{k:20s} {v}")
    for line in result.malformed[:20]:
        print("malformed:", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
