"""streamd: a live video analyzer built on SmolVLM2."""

__version__ = "0.1.0"
