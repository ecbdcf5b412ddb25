"""molar: Multimodal LLMs with collaborative-filtering alignment for sequential recommendation."""

__version__ = "0.1.0"
