"""The CPU shims rely on private megatron-core names: fail loudly when the release moves them."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import pytest

from qwen35_bridge import versions
from qwen35_bridge.megatron import shims as megatron_shims


def test_installed_megatron_core_is_the_pinned_release() -> None:
    assert importlib.metadata.version("megatron-core") == versions.MEGATRON_CORE_VERSION
    versions.require_pinned_megatron_core()


def test_version_mismatch_names_installed_and_expected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.99.0")
    with pytest.raises(ImportError, match=r"0\.99\.0.*0\.19\.2"):
        versions.require_pinned_megatron_core()


@pytest.mark.parametrize(
    ("module_name", "attribute"),
    megatron_shims.PATCHED_ATTRIBUTES + megatron_shims.READ_ATTRIBUTES,
)
def test_patched_and_read_names_exist(module_name: str, attribute: str) -> None:
    module = importlib.import_module(module_name)
    assert hasattr(module, attribute), f"{module_name}.{attribute} is gone"


@pytest.mark.parametrize(("module_name", "function", "name"), megatron_shims.PROVIDED_GLOBALS)
def test_provided_globals_are_still_looked_up(module_name: str, function: str, name: str) -> None:
    module = importlib.import_module(module_name)
    code = inspect.unwrap(getattr(module, function)).__code__
    assert name in code.co_names, f"{module_name}.{function} no longer looks up {name}"


def test_gdn_calls_l2norm_through_the_patched_module() -> None:
    common = importlib.import_module("megatron.core.ssm.gated_delta_net.common")
    source = inspect.getsource(inspect.unwrap(common._GDNBase._prepare_input_for_gated_delta_rule))
    assert "l2norm(" in source


def test_install_is_idempotent_and_patches_only_without_transformer_engine() -> None:
    without_te = not megatron_shims.transformer_engine_available()
    assert megatron_shims.install_cpu_shims() is without_te
    assert megatron_shims.install_cpu_shims() is without_te
    from megatron.core.models.gpt import gpt_layer_specs

    from qwen35_bridge.megatron.cpu_backend import CPUNorm, CPUSpecProvider

    assert (gpt_layer_specs.TESpecProvider is CPUSpecProvider) is without_te
    assert (gpt_layer_specs.TENorm is CPUNorm) is without_te
