"""Write a Hugging Face model directory (bfloat16 safetensors, config, tokenizer) from a GGUF, for vLLM.

vLLM loads HF-format directories; the bundled SmolLM2 is a Q4_1 GGUF. This reuses research_rt's own
GGUF conversion (`research_rt.loader.gguf_cache.converted_dir`: config and tokenizer through
transformers' GGUF reader, every tensor dequantized by `gguf` + numpy into float32, the q/k rows
un-permuted back to HF order) and stores its tensors as bfloat16, i.e. the numbers research_rt
runs with `dtype="bfloat16"`; the tied head is left tied (config `tie_word_embeddings`).
Runs in research_rt's venv (it imports research_rt); the output directory is read by the vLLM venv.

.venv/bin/python -m benchmarks.peers_hf_dir OUT_DIR [--gguf FILE]   (default: the bundled model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from research_rt.loader.gguf_cache import converted_dir, has_weights
from research_rt.loader.resolve import default_model_path
from research_rt.loader.weights import iterate_safetensors

COPY = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_hf_dir(gguf: Path, out: Path) -> None:
    src = converted_dir(gguf)
    if not has_weights(src):
        raise SystemExit(f"{gguf} is too large for research_rt's converted cache; not supported here")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPY:
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    tensors = {name: t.bfloat16().contiguous() for name, t in iterate_safetensors(src)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--gguf", default=None)
    args = parser.parse_args()
    gguf = Path(args.gguf or default_model_path())
    write_hf_dir(gguf, Path(args.out))
    print(f"wrote {args.out} from {gguf.name}")


if __name__ == "__main__":
    main()
