"""quantrouter: a quantization-aware gRPC router in front of Ollama."""

__version__ = "0.1.0"
__all__ = ["__version__"]
