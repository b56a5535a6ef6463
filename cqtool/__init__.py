"""cqtool: Coupled Quantization (Zhang et al., NeurIPS 2024) of Hugging Face KV caches.

Importing the package does no heavy work: no CUDA initialisation, no kernel build.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
