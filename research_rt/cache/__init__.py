"""KV pool, request-to-token table and the radix prefix cache."""

from research_rt.cache.kv_pool import KVPool, ReqToTokenPool
from research_rt.cache.radix_cache import RadixCache

__all__ = ["KVPool", "RadixCache", "ReqToTokenPool"]
