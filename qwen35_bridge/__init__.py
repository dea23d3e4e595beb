"""The runtime of the Qwen3.5-family bridges: what generated bridges and training code import.

Mapping kinds and their transforms (`mapping`), checkpoint formats (`formats`), whole-checkpoint
conversion on disk (`offline`), megatron-core model building and live load/export (`megatron`),
the HF reference forwards that a conversion is verified against (`reference`), and the committed
bridges (`generated`). It never imports the generator (`qwen35_codegen`), and importing a bridge
imports no torch.
"""

__version__ = "0.1.0"
