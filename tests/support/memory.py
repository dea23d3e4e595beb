"""Peak bytes of tensors created while a piece of code runs, counted exactly.

Every tensor an operator returns is seen (a torch dispatch mode); its storage is counted once,
from its first tensor until the last tensor holding it is garbage: the live bytes a consumer of
a stream would see on top of the model. Storages that existed before (the model's parameters)
are never counted, so views of them are free, as they are in reality.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """`with PeakTensorBytes(existing=model.parameters()) as m: ...`; then `m.peak`, `m.live`."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._existing = {t.untyped_storage().data_ptr() for t in existing}
        self._holders: dict[int, int] = {}  # storage pointer -> live tensors holding it
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        if pointer in self._existing or nbytes == 0:
            return
        if pointer not in self._holders:
            self._holders[pointer] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._holders[pointer] += 1
        weakref.finalize(tensor, self._release, pointer, nbytes)

    def _release(self, pointer: int, nbytes: int) -> None:
        self._holders[pointer] -= 1
        if self._holders[pointer] == 0:
            del self._holders[pointer]
            self.live -= nbytes
