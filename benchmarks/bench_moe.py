"""MoE dispatch: the compiled decode step against eager, on a tiny and a moderately sized random config.

    .venv/bin/python -m benchmarks.bench_moe [--part layer|step|all] [--configs tiny,moderate]
        [--dtype bfloat16] [--batch-sizes 1,2,4,8,16,64]

layer: one FusedExperts call (the routed experts alone) per dispatch of research_rt/models/layers/moe.py:
grouped eager (what prefill runs), and grouped_op / gathered / dense forced under
torch.compile(fullgraph=True) with a static batch; then "auto": the layer's own choice, compiled as
the decode step is (batch 1 static, batches 2+ one graph dynamic in the batch dimension).
step: the whole decode step of a random Qwen2-MoE (shared expert included) through ModelRunner, eager
(the model's forward) vs the compiled DecodeGraphRunner the server uses (its own dispatch choice),
at each batch size with a 128-token context. The fastest of --repeats timed calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

CONFIGS = {
    # the test suite's tiny Qwen2-MoE (tests/conftest.py TINY_CONFIGS), its vocabulary cut to 512
    "tiny": dict(
        hidden_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    # Qwen1.5-MoE-A2.7B's routing (60 experts, top-4) at half its width, 4 layers
    "moderate": dict(
        hidden_size=1024,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=704,
        shared_expert_intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
}


def best_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after two warm-up calls (the machine is shared: the
    minimum is the least disturbed figure)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def bench_layer(name: str, dtype: torch.dtype, batch_sizes: list[int], repeats: int) -> dict[str, dict]:
    from research_rt.models.layers.moe import FusedExperts, route

    cfg = CONFIGS[name]
    hidden, experts, k = cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    torch.manual_seed(0)
    layer = FusedExperts(experts, hidden, cfg["moe_intermediate_size"]).to(dtype)
    with torch.no_grad():
        layer.w13.normal_(0, 0.05)
        layer.w2.normal_(0, 0.05)
    router = torch.randn(experts, hidden, dtype=dtype)
    rows: dict[str, dict] = {}
    for dispatch in ("grouped", "grouped_op", "gathered", "dense", None):
        torch._dynamo.reset()
        layer.dispatch = dispatch

        def call(x, w, ids):
            return layer(x, w, ids)

        if dispatch == "grouped":
            fn, label = call, "grouped (eager)"
        elif dispatch is None:  # as in the decode step: batch 1 static, 2+ one dynamic-batch graph
            fn, label = torch.compile(call, fullgraph=True), "auto (compiled, 2+ dynamic)"
        else:
            fn, label = torch.compile(call, fullgraph=True, dynamic=False), f"{dispatch} (compiled)"
        rows[label] = {}
        for bs in batch_sizes:
            x = torch.randn(bs, hidden, dtype=dtype)
            w, ids = route(x @ router.t(), k, renormalize=False)
            if dispatch is None and bs > 1:
                for t in (x, w, ids):
                    torch._dynamo.mark_dynamic(t, 0, min=2, max=4096)
            with torch.inference_mode():
                rows[label][f"bs={bs}"] = round(
                    best_ms(lambda x=x, w=w, ids=ids, fn=fn: fn(x, w, ids), repeats), 3
                )
    layer.dispatch = None
    return rows


def _runner(name: str, dtype: str, compile_on: bool, max_bs: int):
    """A ModelRunner around a random-weight Qwen2-MoE (no checkpoint on disk: `load_model` replaced)."""
    from transformers import AutoConfig

    import research_rt.executor.model_runner as mr
    from research_rt.loader.model_loader import LoadedModel, build_model, resolve_dtype
    from research_rt.server_args import ServerArgs

    cfg = AutoConfig.for_model(
        "qwen2_moe",
        norm_topk_prob=False,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        **CONFIGS[name],
    )
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    args = ServerArgs(
        model_path="random",
        dtype=dtype,
        max_total_tokens=max_bs * 160 + 64,
        max_running_requests=max_bs,
        enable_torch_compile=compile_on,
        disable_background_compile=True,
        disable_torch_compile=not compile_on,
    ).resolved()
    torch_dtype = resolve_dtype(dtype, cfg, "cpu")

    def random_model(*_args, **_kwargs) -> LoadedModel:
        torch.manual_seed(0)
        model = build_model(cfg, torch_dtype, "cpu")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.05)
                else:
                    p.fill_(1.0 if "norm" in pname else 0.0)
        return LoadedModel(model, cfg, torch_dtype)

    saved = mr.load_model
    mr.load_model = random_model
    try:
        return mr.ModelRunner(args, source=None, config=cfg)
    finally:
        mr.load_model = saved


def bench_step(name: str, dtype: str, batch_sizes: list[int], repeats: int, context: int = 128) -> dict:
    from research_rt.core.forward_batch import ForwardMode
    from research_rt.executor.model_runner import StepInput

    max_bs = max(batch_sizes)
    rows: dict[str, dict] = {}
    for compile_on in (False, True):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        runner = _runner(name, dtype, compile_on, max_bs)
        startup = time.perf_counter() - t0
        label = "compiled" if compile_on else "eager"
        rows[label] = {"startup_s": round(startup, 1)}
        vocab = CONFIGS[name]["vocab_size"]
        for bs in batch_sizes:
            reqs = []
            for i in range(bs):  # request rows whose first `context` slots are distinct KV slots
                row = runner.req_to_token.table[i]
                row[: context + 1] = torch.arange(1 + i * (context + 1), 1 + (i + 1) * (context + 1))
                reqs.append(
                    SimpleNamespace(
                        req_pool_row=i,
                        input_ids=[(7 * i + 3) % vocab] * context,
                        output_ids=[5],
                        interventions=None,
                    )
                )
            items = [StepInput(r, context, 1) for r in reqs]
            loc = torch.stack([runner.req_to_token.table[i, context] for i in range(bs)])
            rows_out = torch.arange(bs)

            def step(items=items, loc=loc, rows_out=rows_out, runner=runner):
                batch = runner.make_batch(ForwardMode.DECODE, items, loc)
                return runner.forward(batch, rows_out)

            rows[label][f"bs={bs}"] = round(best_ms(step, repeats), 2)
        del runner
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=["layer", "step", "all"])
    parser.add_argument("--configs", default="tiny,moderate")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, dict] = {}
    for name in args.configs.split(","):
        if args.part in ("layer", "all"):
            out[f"{name} layer ms"] = bench_layer(name, getattr(torch, args.dtype), sizes, args.repeats)
            print(json.dumps({f"{name} layer ms": out[f"{name} layer ms"]}, indent=1), flush=True)
        if args.part in ("step", "all"):
            out[f"{name} decode step ms"] = bench_step(name, args.dtype, sizes, args.repeats)
            print(json.dumps({f"{name} decode step ms": out[f"{name} decode step ms"]}, indent=1), flush=True)
    print(json.dumps({"bench_moe": out, "dtype": args.dtype, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
