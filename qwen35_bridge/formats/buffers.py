"""Memory that checkpoint readers read into (and conversions join tensors into), used again once
no tensor uses it."""

from __future__ import annotations

import math

import torch


def _users(storage: torch.UntypedStorage) -> int:
    """How many tensors (and this handle) share `storage`: PyTorch's own count, which a view, a
    reshape or a numpy array of any of them holds too."""
    return torch._C._storage_Use_Count(storage._cdata)


class ReadBuffers:
    """Memory that tensors are read into from a checkpoint file, used again once no tensor uses it.

    Fresh memory costs a page fault per 4 KiB page when first written; measured here, reading into
    new memory took 6x as long as reading into memory touched before, and it made reading a
    torch_dist checkpoint the slowest conversion. Conversions hand the same kind of memory to the
    transforms that join tensors (`transforms.outputs_from`). A buffer is handed out again only
    when PyTorch counts no tensor on it, so nothing still holding an earlier tensor can see it
    overwritten.
    """

    def __init__(self) -> None:
        self._storages: list[torch.UntypedStorage] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        free = [s for s in self._storages if _users(s) == 1]
        fitting = [s for s in free if s.nbytes() >= nbytes]
        if fitting:
            storage = min(fitting, key=lambda s: s.nbytes())
        else:  # a new buffer; free ones too small for this key go, so that memory stays bounded
            self._storages = [s for s in self._storages if all(s is not f for f in free)]
            storage = torch.UntypedStorage(nbytes)
            self._storages.append(storage)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def clear(self) -> None:
        self._storages.clear()
