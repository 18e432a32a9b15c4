"""Model runner, forward batch, attention backends and the sampler."""
