"""Finding a model (directory, hub id in the local cache, .gguf file) and loading its weights:
resolve.py finds it, gguf_cache.py converts a GGUF once, weights.py iterates a checkpoint's
tensors, model_loader.py builds the module and loads them."""
