"""Model architectures, one file each, found through the registry (importing this package
registers every built-in architecture)."""

from research_rt.models import bert, classification, llama, mixtral, qwen2, qwen2_moe, qwen3  # noqa: F401
from research_rt.models.registry import register_model, resolve_model_class, supported_architectures

__all__ = ["register_model", "resolve_model_class", "supported_architectures"]
