"""Model registry keyed by the `architectures` field of a checkpoint's config. The built-in
models register themselves when `research_rt.models` is imported (its `__init__`).

A researcher registers a modified class from their own script, no edit inside the package:

    @research_rt.register_model("LlamaForCausalLM", override=True)
    class MyLlama(research_rt.models.llama.LlamaForCausalLM): ...
"""

from __future__ import annotations

from collections.abc import Callable

_REGISTRY: dict[str, type] = {}


def register_model(architecture: str, override: bool = False) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if architecture in _REGISTRY and not override and _REGISTRY[architecture] is not cls:
            raise ValueError(
                f"{architecture} is already registered ({_REGISTRY[architecture].__name__}); pass override=True"
            )
        _REGISTRY[architecture] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_model_class(architectures: list[str] | None) -> type:
    for arch in architectures or []:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ValueError(
        f"Unsupported model architecture {architectures}. Supported: {', '.join(sorted(_REGISTRY))}."
    )


# SGLang's `is_generation_model`: these architectures are served as embedding models
EMBEDDING_ARCHITECTURES = ("LlamaEmbeddingModel", "MistralModel", "BertModel", "CLIPModel")
EMBEDDING_SUFFIXES = ("ForSequenceClassification", "ForRewardModel")


def is_embedding_architecture(architectures: list[str] | None) -> bool:
    """Whether a checkpoint's `architectures` makes it an embedding (or reward) model by default."""
    return any(a in EMBEDDING_ARCHITECTURES or a.endswith(EMBEDDING_SUFFIXES) for a in architectures or [])
