"""Generator of HuggingFace <-> Megatron-Core checkpoint bridges for the Qwen3.5 family.

It reads configs (`sources`, `catalog`), infers a spec (`spec`), renders bridge modules
(`rendering`), keeps the committed ones in step (`registry`), explains changes (`review`) and
converts checkpoints from the command line (`cli`). Bridges it writes import only `qwen35_bridge`.
"""

from qwen35_bridge import __version__

__all__ = ["__version__"]
