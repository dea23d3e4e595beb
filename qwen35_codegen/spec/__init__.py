"""The spec: what the generator knows about a model, inferred from its config and weight map."""

from qwen35_codegen.spec.infer import LayoutChoices, Statement, infer_spec
from qwen35_codegen.spec.model_spec import (
    AttentionSpec,
    GDNSpec,
    ModelSpec,
    MoESpec,
    QuantizationSpec,
    VisionSpec,
)

__all__ = [
    "AttentionSpec",
    "GDNSpec",
    "LayoutChoices",
    "ModelSpec",
    "MoESpec",
    "QuantizationSpec",
    "Statement",
    "VisionSpec",
    "infer_spec",
]
