"""Reference pipeline for refusal-direction research (Arditi et al., 2024)."""

__version__ = "0.1.0"
