"""NVIDIA ModelOpt checkpoints (NVFP4, MXFP8, per-tensor FP8, ...): recognised and refused.

ModelOpt's unified HF export marks its checkpoints with `hf_quant_config.json`
(`quantization.quant_algo`), or with a `quantization_config` whose `quant_method` is `modelopt`.
Its weights are stored packed (NVFP4: two e2m1 values per uint8, with per-16-element e4m3 scales
and a global scale), a layout no bridge maps; converting them as plain tensors would give wrong
weights, so every reader stops at the folder with the format's name instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwen35_bridge.errors import ConversionError

MODELOPT_CONFIG_NAME = "hf_quant_config.json"
REFUSAL = (
    "NVIDIA ModelOpt {algo} checkpoint ({where}): not supported, its weights are stored in "
    "ModelOpt's quantised layout, which no bridge converts; convert the unquantised (bf16) "
    "release, or a block-FP8 one"
)


def refuse_modelopt(directory: Path, config: Mapping[str, Any] | None = None) -> None:
    """Raise ConversionError naming the format if `directory` (or its `config`) is ModelOpt's."""
    marker = Path(directory) / MODELOPT_CONFIG_NAME
    if marker.is_file():
        try:
            algo = json.loads(marker.read_bytes()).get("quantization", {}).get("quant_algo")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            algo = None
        raise ConversionError(REFUSAL.format(algo=algo or "quantised", where=marker))
    quantization = (config or {}).get("quantization_config")
    if isinstance(quantization, Mapping) and quantization.get("quant_method") == "modelopt":
        algo = quantization.get("quant_algo") or "quantised"
        raise ConversionError(
            REFUSAL.format(
                algo=algo, where=f"{Path(directory) / 'config.json'}: quant_method modelopt"
            )
        )
