"""research_rt: a PyTorch-native, compile-centric research runtime speaking SGLang's native API."""

from research_rt.engine.engine import Engine
from research_rt.models.registry import register_model, supported_architectures
from research_rt.server_args import ServerArgs

__version__ = "0.1.0"
__all__ = ["Engine", "ServerArgs", "__version__", "register_model", "supported_architectures"]
