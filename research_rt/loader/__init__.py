"""Finding a model (directory, hub id in the local cache, .gguf file) and loading its weights."""

from research_rt.loader.model_loader import LoadedModel, load_model
from research_rt.loader.resolve import ModelNotFoundError, ModelSource, resolve_model_path

__all__ = ["LoadedModel", "ModelNotFoundError", "ModelSource", "load_model", "resolve_model_path"]
