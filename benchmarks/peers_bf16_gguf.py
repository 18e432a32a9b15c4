"""Write a BF16 GGUF from the bundled Q4_1 SmolLM2 GGUF, for llama.cpp in `make bench-peers`.

Every quantized tensor (Q4_1, one Q8_0) is dequantized and stored as bfloat16; F32 tensors (the norms)
stay F32; metadata and tokenizer are copied unchanged. These are the weights research_rt runs with
`dtype="bfloat16"` (it dequantizes the same file), so llama.cpp BF16 vs research_rt bf16 compares the
same numbers. Needs only `gguf` and `numpy` (no torch/transformers/sentencepiece, unlike llama.cpp's
convert_hf_to_gguf.py); runs in the llama venv and does not import research_rt.

.peers/llama/bin/python benchmarks/peers_bf16_gguf.py SRC.Q4_1.gguf OUT.BF16.gguf
"""

from __future__ import annotations

import argparse
import os

import gguf
import numpy as np

SKIP = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type"}


def convert(src: str, out: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out + ".tmp", arch)
    for key, field in reader.fields.items():
        if key in SKIP:
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub_type = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, np.asarray(t.data))
            continue
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        bf16 = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(t.name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".tmp", out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args()
    convert(args.src, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
