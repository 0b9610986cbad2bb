"""FlashFace-TRT: a deployment engine for FlashFace (arXiv 2403.17008)."""

__version__ = "0.1.0"
