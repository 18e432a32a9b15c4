"""The Sanic HTTP server: SGLang's native API and the OpenAI-compatible API over one Engine."""

from research_rt.server.app import create_app

__all__ = ["create_app"]
