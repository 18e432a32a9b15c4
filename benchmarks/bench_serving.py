"""HTTP load generator against a running research_rt (or SGLang) server: Poisson arrivals, streaming.

    .venv/bin/python -m benchmarks.bench_serving --base-url http://127.0.0.1:30000 --num-prompts 64 --rate 4

Reports TTFT, inter-token latency and end-to-end latency percentiles and output throughput.
Without --base-url it launches `python -m research_rt.launch_server` itself on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import aiohttp


async def one_request(session: aiohttp.ClientSession, url: str, ids: list[int], new_tokens: int) -> dict:
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url + "/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            json.loads(line[5:])
            stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - t0,
        "e2e": stamps[-1] - t0,
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": len(stamps),
    }


async def run(url: str, prompts: list[list[int]], new_tokens: int, rate: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        tasks = []
        t0 = time.perf_counter()
        for ids in prompts:
            tasks.append(asyncio.create_task(one_request(session, url, ids, new_tokens)))
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    itl = [x for r in results for x in r["itl"]]

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

    return {
        "requests": len(results),
        "output_throughput_tok_s": sum(r["tokens"] for r in results) / elapsed,
        "ttft_p50_s": pct([r["ttft"] for r in results], 50),
        "ttft_p99_s": pct([r["ttft"] for r in results], 99),
        "itl_p50_ms": 1000 * pct(itl, 50),
        "itl_p99_ms": 1000 * pct(itl, 99),
        "e2e_p50_s": pct([r["e2e"] for r in results], 50),
        "e2e_mean_s": statistics.mean(r["e2e"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s (Poisson); 0 = all at once")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--server-args", default="", help="extra launch flags, e.g. --enable-torch-compile")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from benchmarks.common import random_prompts
    from research_rt.loader.model_loader import load_tokenizer
    from research_rt.loader.resolve import resolve_model_path

    prompts = random_prompts(load_tokenizer(resolve_model_path(None)), args.num_prompts, 32, 512, seed=0)
    proc = None
    url = args.base_url
    if url is None:
        import sys

        from research_rt.utils import launch_server_cmd, terminate_process, wait_for_server

        cmd = f"{sys.executable} -m research_rt.launch_server --host 127.0.0.1 --disable-background-compile {args.server_args}"
        proc, port = launch_server_cmd(cmd, host="127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, timeout=600)
    try:
        result = asyncio.run(run(url, prompts, args.new_tokens, args.rate))
    finally:
        if proc is not None:
            terminate_process(proc)
    for k, v in result.items():
        print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
