"""Model architectures, one file each, found through the registry."""

from research_rt.models.registry import register_model, resolve_model_class, supported_architectures

__all__ = ["register_model", "resolve_model_class", "supported_architectures"]
