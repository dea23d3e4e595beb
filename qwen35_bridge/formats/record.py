"""The record a Megatron checkpoint written by this project keeps beside its tensors, defined once.

`codegen.json` says which model and bridge wrote it, the bridge's spec (as data, with its
fingerprint), the megatron-core model class whose names the tensors have (its target: `gpt` or
`hybrid`, `gpt` when absent), the tensor format, and which tensors were FP8 in the source. The HF config and
generation config are kept too (`hf_config.json`, `hf_generation_config.json`), so that the way back
needs no other input. Reading the record checks its schema; whether its spec is the model's is for
the generator to judge (it infers specs).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.paths import CONFIG_NAME, GENERATION_CONFIG_NAME, TOKENIZER_FILES
from qwen35_bridge.targets import DEFAULT_TARGET, TARGETS

RECORD_NAME = "codegen.json"
HF_CONFIG_NAME = "hf_config.json"
#: HF files kept beside the Megatron tensors (under an `hf_` prefix) and restored on the way back.
KEPT_HF_FILES = (GENERATION_CONFIG_NAME,)

FORMAT_SAFETENSORS = "megatron-safetensors"
FORMAT_TORCH_DIST = "megatron-torch_dist"
#: `--format` choice -> the record's `format`.
FORMATS = {"safetensors": FORMAT_SAFETENSORS, "torch_dist": FORMAT_TORCH_DIST}


@dataclass(frozen=True)
class Record:
    """What `codegen.json` holds."""

    model_id: str
    spec_sha256: str
    spec: dict[str, Any]
    bridge_module: str
    format: str = FORMAT_SAFETENSORS
    fp8_tensors: tuple[str, ...] = field(default=())
    target: str = DEFAULT_TARGET

    def write(self, directory: Path) -> None:
        data = asdict(self)
        data["fp8_tensors"] = list(self.fp8_tensors)
        if not self.fp8_tensors:
            del data["fp8_tensors"]
        if self.target == DEFAULT_TARGET:
            del data["target"]
        (Path(directory) / RECORD_NAME).write_text(
            json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    @classmethod
    def read(cls, directory: Path) -> Record:
        """The record of a Megatron checkpoint folder, its schema checked (one-line errors)."""
        path = Path(directory) / RECORD_NAME
        if not path.is_file():
            raise ConversionError(
                f"{directory}: no {RECORD_NAME}; not a Megatron checkpoint written by codegen convert"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
            raise ConversionError(f"{path}: not a record written by codegen convert (no spec)")
        if not isinstance(data.get("model_id"), str) or not data["model_id"]:
            raise ConversionError(f"{path}: no model_id")
        fmt = data.get("format", FORMAT_SAFETENSORS)
        if fmt not in FORMATS.values():
            raise ConversionError(f"{path}: unknown format {fmt!r}")
        fp8 = data.get("fp8_tensors", [])
        if not isinstance(fp8, list) or not all(isinstance(n, str) for n in fp8):
            raise ConversionError(f"{path}: fp8_tensors must be a list of tensor names")
        target = data.get("target", DEFAULT_TARGET)
        if target not in TARGETS:
            raise ConversionError(
                f"{path}: unknown target {target!r}; expected one of {', '.join(TARGETS)}"
            )
        return cls(
            model_id=data["model_id"],
            spec_sha256=str(data.get("spec_sha256", "")),
            spec=data["spec"],
            bridge_module=str(data.get("bridge_module", "")),
            format=fmt,
            fp8_tensors=tuple(fp8),
            target=target,
        )


def read_hf_config(directory: Path) -> dict[str, Any]:
    """The HF config kept with a Megatron checkpoint (any UTF encoding, as json reads bytes)."""
    path = Path(directory) / HF_CONFIG_NAME
    try:
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the HF config ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return config


def keep_hf_files(hf_dir: Path, staging: Path) -> None:
    """Keep the HF config (and generation config) with the Megatron checkpoint, for the way back."""
    shutil.copyfile(Path(hf_dir) / CONFIG_NAME, staging / HF_CONFIG_NAME)
    for name in KEPT_HF_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, staging / f"hf_{name}")


def restore_hf_files(megatron_dir: Path, staging: Path, *, quantized: bool) -> None:
    """The HF config back beside the HF tensors; without `quantization_config` unless quantized."""
    config = json.loads((Path(megatron_dir) / HF_CONFIG_NAME).read_bytes())
    if "quantization_config" in config and not quantized:
        del config["quantization_config"]
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    else:
        shutil.copyfile(Path(megatron_dir) / HF_CONFIG_NAME, staging / CONFIG_NAME)
    for name in KEPT_HF_FILES:
        if (Path(megatron_dir) / f"hf_{name}").is_file():
            shutil.copyfile(Path(megatron_dir) / f"hf_{name}", staging / name)


def copy_hf_config(hf_dir: Path, staging: Path) -> None:
    """An HF folder's config (without `quantization_config`: the tensors written are not
    quantised) and generation config, beside freshly written HF tensors."""
    path = Path(hf_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the HF config ({e})") from None
    write_hf_config(config, staging, Path(hf_dir))


def write_hf_config(config: dict[str, Any], staging: Path, hf_dir: Path | None = None) -> None:
    """`config` (without `quantization_config`) as the HF config of freshly written tensors, with
    the generation config of `hf_dir` when it has one."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in KEPT_HF_FILES:
        if hf_dir is not None and (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, staging / name)


def copy_tokenizer_files(source: Path | None, destination: Path) -> None:
    """The tokenizer's and processor's files of `source` (those it has) into `destination`,
    created only if there is one to copy."""
    found = [Path(source) / n for n in TOKENIZER_FILES if source and (Path(source) / n).is_file()]
    if found:
        Path(destination).mkdir(exist_ok=True)
    for path in found:
        shutil.copyfile(path, Path(destination) / path.name)
