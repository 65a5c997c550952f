"""The bench's sections, one module each: each takes the `Context` and returns its `Row`s (and, for the DiT and
SD-VAE, the parameter counts of both sides)."""
