"""`--torchao-config`: which weight-only quantization the linear layers use (see models/layers/quant.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int  # 8 or 4
    group_size: int  # int4 only; int8 is per output channel

    @staticmethod
    def parse(spec: str | None) -> WeightOnlyConfig | None:
        """`int8wo`, `int4wo-<group>` (SGLang's --torchao-config spelling), or empty for none."""
        if not spec:
            return None
        if spec == "int8wo":
            return WeightOnlyConfig(8, 0)
        if spec.startswith("int4wo-") and spec[7:].isdigit() and int(spec[7:]) in (32, 64, 128, 256):
            return WeightOnlyConfig(4, int(spec[7:]))
        raise ValueError(
            f"torchao_config must be one of '', 'int8wo', 'int4wo-32', 'int4wo-64', 'int4wo-128', "
            f"'int4wo-256', got {spec!r}"
        )
