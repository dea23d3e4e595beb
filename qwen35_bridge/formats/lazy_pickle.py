"""`torch.save` files opened without running their code and without reading their tensors.

A trainer's checkpoint file holds the model beside its optimizer state and `args`, an
`argparse.Namespace` whose values may be any class of the trainer's code. Loading it with
`weights_only=True` fails on those classes; with `weights_only=False` it would run whatever the file
names. Here every class outside a short list of tensor builders becomes an inert stand-in that only
keeps its pickled state, and storages are memory-mapped, so a tensor's bytes are read only when it
is used: the optimizer's moments, never asked for, are never read.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from qwen35_bridge.errors import ConversionError

#: What a tensor, a parameter or a state dict needs to be rebuilt; nothing else is ever called.
_BUILDERS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "device"),
    }
)


class Stub:
    """Stands in for a class of the trainer's code: it keeps what the pickle gives it, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _Unpickler(pickle.Unpickler):
    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _BUILDERS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        return self._stubs.setdefault(
            f"{module}.{name}", type(name, (Stub,), {"__module__": f"stub.{module}"})
        )


#: The `pickle_module` torch.load takes: its Unpickler is the restricted one above.
_RESTRICTED = types.SimpleNamespace(Unpickler=_Unpickler, __name__="qwen35_bridge_restricted")


def load(path: Path) -> Any:
    """The object `torch.save` wrote to `path`, its tensors memory-mapped (read on use) and every
    class but the tensor builders replaced by a `Stub`. A file that is not a `torch.save` zip
    archive is a one-line error naming it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path}: not a torch.save archive (missing, truncated, or saved in PyTorch's pre-1.6 format)"
        )
    try:
        return torch.load(
            path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_RESTRICTED
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: cannot read this torch.save archive ({e})") from None
