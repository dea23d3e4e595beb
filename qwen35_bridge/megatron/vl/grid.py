"""Where each patch of an image (or video frame) sits, and what the vision tower derives from it.

Qwen3.5's image processor emits the patches of each frame in spatial-merge-block order: the
``m x m`` patches that the merger fuses into one token are consecutive (blocks row by row, each
block row by row). The learned position table, the 2-D rotary angles and the attention segments
all follow that order. Grids are ``(t, h, w)`` in patches, one row per image or video.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _grids(grid_thw: Tensor) -> list[tuple[int, int, int]]:
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]


def block_order(h: int, w: int, merge: int) -> Tensor:
    """The raster index (row * w + col) of each patch of one frame, in merge-block order."""
    if h % merge or w % merge:
        raise ValueError(
            f"a frame of {h} x {w} patches does not divide into {merge} x {merge} blocks"
        )
    raster = torch.arange(h * w).view(h // merge, merge, w // merge, merge)
    return raster.permute(0, 2, 1, 3).reshape(-1)


def patch_rows_cols(grid_thw: Tensor, merge: int) -> tuple[Tensor, Tensor]:
    """Row and column of every patch, in the order the patches arrive (frames repeat them)."""
    rows, cols = [], []
    for t, h, w in _grids(grid_thw):
        order = block_order(h, w, merge).repeat(t)
        rows.append(order // w)
        cols.append(order % w)
    return torch.cat(rows), torch.cat(cols)


def interpolated_position_embeddings(table: Tensor, grid_thw: Tensor, merge: int) -> Tensor:
    """The learned ``side x side`` position table resampled to each frame's grid (bilinear, corners
    aligned), in patch order: ``[patches, hidden]``."""
    side = int(round(table.shape[0] ** 0.5))
    if side * side != table.shape[0]:
        raise ValueError(f"a position table of {table.shape[0]} rows is not a square grid")
    square = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, C, side, side]
    pieces = []
    for t, h, w in _grids(grid_thw):
        resized = F.interpolate(square, size=(h, w), mode="bilinear", align_corners=True)
        raster = resized.squeeze(0).permute(1, 2, 0).reshape(h * w, -1)
        pieces.append(raster[block_order(h, w, merge)].repeat(t, 1))
    return torch.cat(pieces).to(table.dtype)


def rotary_angles(grid_thw: Tensor, merge: int, head_dim: int, theta: float) -> Tensor:
    """2-D rotary angles ``[patches, 1, 1, head_dim]``: a quarter of the head's frequencies turn with
    the row, a quarter with the column, and the halves repeat (``rotate_half`` pairing)."""
    spatial = head_dim // 2  # the frequencies of one axis span half the head
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
    rows, cols = patch_rows_cols(grid_thw, merge)
    by_row, by_col = rows[:, None] * inv_freq, cols[:, None] * inv_freq
    return torch.cat([by_row, by_col, by_row, by_col], dim=-1)[:, None, None, :]


def frame_boundaries(grid_thw: Tensor) -> Tensor:
    """``cu_seqlens`` (int32) of the attention segments: each frame attends only within itself."""
    lengths = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
