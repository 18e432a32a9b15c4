"""Building blocks shared by the model files."""

from research_rt.models.layers.attention import Attention
from research_rt.models.layers.norm import RMSNorm
from research_rt.models.layers.rotary import RotaryEmbedding

__all__ = ["Attention", "RMSNorm", "RotaryEmbedding"]
