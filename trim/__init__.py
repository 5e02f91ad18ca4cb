"""trim: per-input token and attention-head pruning for vision-language and SAM-style models."""

__version__ = "0.1.0"
