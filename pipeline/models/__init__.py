"""Model loading and the per-family adapters."""
