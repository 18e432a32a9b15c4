"""Sentence-transformers pooling for encoder models, read from the checkpoint's own files.

`modules.json` lists the pipeline; its `sentence_transformers.models.Pooling` entry points at a
folder whose `config.json` names the mode (`pooling_mode_mean_tokens`, `pooling_mode_cls_token`,
`pooling_mode_max_tokens`, `pooling_mode_mean_sqrt_len_tokens`, `pooling_mode_lasttoken`), and a
`sentence_transformers.models.Normalize` entry means L2 normalization. A checkpoint without
`modules.json` gets SGLang's BERT default: CLS pooling, normalized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentencePooling:
    mode: str = "cls"
    normalize: bool = True

    @classmethod
    def from_directory(cls, directory: Path | str) -> SentencePooling:
        directory = Path(directory)
        modules_file = directory / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        mode, normalize = "cls", False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("models.Pooling"):
                config = json.loads((directory / module.get("path", "") / "config.json").read_text())
                enabled = [name for key, name in MODES.items() if config.get(key)]
                if len(enabled) != 1:
                    raise ValueError(f"unsupported sentence-transformers pooling config: {config}")
                mode = enabled[0]
            elif kind.endswith("models.Normalize"):
                normalize = True
        return cls(mode, normalize)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, H], mask [B, L] (1 = real token) -> [B, H] float32."""
        hidden, m = hidden.float(), mask.float().unsqueeze(-1)
        lengths = m.sum(dim=1).clamp(min=1)
        if self.mode == "cls":
            out = hidden[:, 0]
        elif self.mode == "mean":
            out = (hidden * m).sum(dim=1) / lengths
        elif self.mode == "mean_sqrt_len":
            out = (hidden * m).sum(dim=1) / lengths.sqrt()
        elif self.mode == "max":
            out = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        else:  # lasttoken (right padding)
            out = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1).long() - 1]
        return F.normalize(out, dim=-1) if self.normalize else out
