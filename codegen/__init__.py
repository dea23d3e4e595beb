"""Generator of HuggingFace <-> Megatron-Core checkpoint bridges for the Qwen3.5 family."""

__version__ = "0.1.0"
