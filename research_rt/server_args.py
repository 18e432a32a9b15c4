"""ServerArgs: every knob of the runtime, with SGLang's flag names and defaults.

The same frozen dataclass configures the offline `Engine` (as keyword arguments) and the HTTP
server (as `--flag-name` command-line options). Constructing one only validates it; defaults that
depend on the machine or the environment (device, chunk size, compile on/off, seed) are filled in
by `resolved()`, which the Engine and the launcher call once at launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

from research_rt.core.quant_config import WeightOnlyConfig

SCHEDULE_POLICIES = ("fcfs", "lpm", "random", "dfs-weight")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")

logger = logging.getLogger("research_rt.server_args")


@dataclass(frozen=True)
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer_path: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    context_length: int | None = None
    is_embedding: bool = False
    skip_tokenizer_init: bool = False
    served_model_name: str | None = None
    device: str = "auto"
    weight_version: str = "default"  # reported in meta_info; /update_weight_version changes it

    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    stream_interval: int = 1
    stream_output: bool = False
    enable_metrics: bool = False
    enable_cache_report: bool = False
    log_level: str = "info"
    log_level_http: str | None = None
    log_requests: bool = False

    # Memory and scheduling
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 16384
    max_running_requests: int | None = None
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    # Per-request `priority` (scheduler/priority.py): higher values run first (lower ones with
    # schedule_low_priority_values_first); a waiting request may preempt running ones whose
    # priority is worse by more than the threshold.
    enable_priority_scheduling: bool = False
    schedule_low_priority_values_first: bool = False
    priority_scheduling_preemption_threshold: int = 10
    abort_on_priority_when_disabled: bool = False  # 400 for a `priority` sent while disabled
    disable_radix_cache: bool = False
    enable_mixed_chunk: bool = False  # running decodes join each prefill chunk's forward
    page_size: int = 1
    random_seed: int | None = None

    # Compile and graphs. enable_torch_compile None: decided by resolved() (on for CPU, off on CUDA)
    enable_torch_compile: bool | None = None
    disable_torch_compile: bool = False
    torch_compile_max_bs: int | None = None  # None: every batch size (one dynamic-batch graph on CPU)
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None
    attention_backend: str | None = None
    torchao_config: str = ""

    # Speculative decoding (SGLang's flags): only NGRAM (prompt lookup, scheduler/speculative.py).
    # The n-gram trie flags (bfs breadth, match type, branch length, capacity) are accepted and
    # ignored: drafts are one chain from the last earlier occurrence in the request's own tokens.
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int | None = None  # None: 4 with NGRAM
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12
    speculative_ngram_min_bfs_breadth: int = 1
    speculative_ngram_max_bfs_breadth: int = 10
    speculative_ngram_match_type: str = "BFS"
    speculative_ngram_branch_length: int = 18
    speculative_ngram_capacity: int = (
        10_000_000  # weight-only quantization for batch-1 decode: int8wo, int4wo-<group>
    )

    # Features
    enable_custom_logit_processor: bool = False
    enable_return_hidden_states: bool = False  # allow `return_hidden_states` requests (SGLang's flag)
    tp_size: int = 1
    dp_size: int = 1

    # research_rt extras
    decode_log_interval: int = 40
    # CPU: compile the decode step before serving instead of serving eagerly while it compiles
    # in the background (executor/graph_runner.py); benchmarks set it to time the compiled path
    disable_background_compile: bool = False
    enable_interventions: bool = False  # allow /generate's capture, steer and ablate fields
    intervention_max_capture_bytes: int = 64 << 20  # per request, counted as float32 before encoding
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # Accepted for SGLang compatibility only: research_rt ignores these; the Engine logs a warning
    # for each one set to anything but its default (`warn_ignored_flags`, COMPAT_ONLY).
    kv_cache_dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    chat_template: str | None = None
    watchdog_timeout: float = 300.0
    allow_auto_truncate: bool = False
    file_storage_path: str = "sglang_storage"
    disable_overlap_schedule: bool = False
    sampling_backend: str | None = None
    grammar_backend: str | None = None

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.priority_scheduling_preemption_threshold < 0:
            raise ValueError("priority_scheduling_preemption_threshold must be at least 0")
        if self.page_size != 1:
            raise ValueError("only page_size 1 is supported")
        WeightOnlyConfig.parse(self.torchao_config)  # raises on an unknown spelling
        if self.speculative_algorithm not in (None, "NGRAM"):
            raise ValueError(
                f"speculative_algorithm: only NGRAM is supported, got {self.speculative_algorithm!r}"
            )
        if (
            not 1
            <= self.speculative_ngram_min_match_window_size
            <= self.speculative_ngram_max_match_window_size
        ):
            raise ValueError("need 1 <= speculative_ngram_min_match_window_size <= ..._max_match_window_size")

    def resolved(self, environ: dict[str, str] | None = None) -> ServerArgs:
        """These args with the launch-time defaults filled in (idempotent): the device ("auto":
        CUDA when present), chunked_prefill_size (2048), cuda_graph_max_bs,
        enable_torch_compile (on for CPU, where the compiled decode step is 2-3x faster; off on
        CUDA, where CUDA graphs are the default, as in SGLang; RESEARCH_RT_TORCH_COMPILE=0/1 in the
        environment changes that default) and a random seed."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        device = self.device
        if device == "auto":
            import torch

            device = changes["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if self.random_seed is None:
            changes["random_seed"] = random.randint(0, 1 << 30)
        if self.chunked_prefill_size is None:
            # 2048 on CPU too (SGLang's CPU deployments pass it): oneDNN's bfloat16 GEMMs over
            # SmolLM2's linears run at ~381 GFLOP/s on 512 rows and ~417 on 1024-2048 (Zen 5, 2
            # threads), so W2's prefill spent 8.7 s in them instead of 9.7 s; prefill goes first
            # either way, so running decodes wait for a whole prompt whatever the chunk
            # (benchmarks/RESULTS.md, "Prefill chunks of 2048 tokens on CPU").
            changes["chunked_prefill_size"] = 2048
        if self.cuda_graph_max_bs is None:
            changes["cuda_graph_max_bs"] = 160
        if self.speculative_algorithm and self.speculative_num_draft_tokens is None:
            changes["speculative_num_draft_tokens"] = 4
        if self.disable_torch_compile:
            changes["enable_torch_compile"] = False
        elif self.enable_torch_compile is None:
            default = env.get("RESEARCH_RT_TORCH_COMPILE", "1" if device == "cpu" else "0")
            changes["enable_torch_compile"] = default not in ("0", "false", "")
        return dataclasses.replace(self, **changes) if changes else self

    def warn_ignored_flags(self) -> None:
        """Log a warning for each compatibility-only field set to something other than its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(ServerArgs)}
        for name in COMPAT_ONLY:
            if getattr(self, name) != defaults[name]:
                flag = "--" + name.replace("_", "-")
                logger.warning("%s is accepted for SGLang compatibility and ignored by research_rt.", flag)

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add one `--flag-name` per field, with SGLang's spelling."""
        for f in dataclasses.fields(ServerArgs):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if f.type in ("bool", "bool | None") or isinstance(default, bool):
                parser.add_argument(flag, action="store_true", default=default)
                continue
            kind = _cli_type(f.type)
            kwargs: dict[str, Any] = {"type": kind, "default": default}
            if f.name == "schedule_policy":
                kwargs["choices"] = SCHEDULE_POLICIES
            elif f.name == "dtype":
                kwargs["choices"] = DTYPES
            elif f.name == "load_format":
                kwargs["choices"] = LOAD_FORMATS
            parser.add_argument(flag, **kwargs)

    @staticmethod
    def from_cli_args(args: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(ServerArgs)} - {"extra"}
        return ServerArgs(**{k: v for k, v in vars(args).items() if k in names})


COMPAT_ONLY = (
    "kv_cache_dtype",
    "trust_remote_code",
    "revision",
    "chat_template",
    "watchdog_timeout",
    "allow_auto_truncate",
    "file_storage_path",
    "disable_overlap_schedule",
    "sampling_backend",
    "grammar_backend",
    "speculative_ngram_min_bfs_breadth",
    "speculative_ngram_max_bfs_breadth",
    "speculative_ngram_match_type",
    "speculative_ngram_branch_length",
    "speculative_ngram_capacity",
)


def _cli_type(annotation: str) -> type:
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return str
