"""Multimodal rotary positions (mRoPE) of the Qwen3.5 language model: where each token sits, and
the interleaved rotary frequencies that read those positions.

Every token has three positions (temporal, height, width). Text tokens count on along one line
(p, p, p); the tokens of an image sit on its merged patch grid, all three offset by the position
where the image starts, and the text after it resumes at that start + max(grid_h, grid_w). Each
rotary frequency then follows one of the three axes, interleaved: frequency j follows h when
j % 3 == 1 and j < 3 * sections[1], w when j % 3 == 2 and j < 3 * sections[2], t otherwise.
megatron-core's ``MultimodalRotaryEmbedding`` gives each axis a contiguous block of frequencies
instead (docs/reference.md section 8), so the language model gets :class:`InterleavedMRoPE`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

TEXT, IMAGE, VIDEO = 0, 1, 2
_KIND_NAMES = {IMAGE: "image", VIDEO: "video"}


def frequency_axes(mrope_section: Sequence[int]) -> list[int]:
    """The axis (0 = t, 1 = h, 2 = w) each rotary frequency follows, interleaved."""
    if len(mrope_section) != 3:
        raise ValueError(f"mrope_section {list(mrope_section)}: expected three sections (t, h, w)")
    _, h, w = mrope_section
    axes = []
    for j in range(sum(mrope_section)):
        if j % 3 == 1 and j < 3 * h:
            axes.append(1)
        elif j % 3 == 2 and j < 3 * w:
            axes.append(2)
        else:
            axes.append(0)
    return axes


class InterleavedMRoPE(nn.Module):
    """Stands in for megatron-core's ``MultimodalRotaryEmbedding`` (same call, same output shape
    ``[s, b, 1, rotary_dim]``) with Qwen3.5's interleaved sections. It holds no state: the
    frequencies are computed on the positions' device, so a model built on ``meta`` still runs
    once loaded."""

    def __init__(self, *, kv_channels: int, rotary_percent: float, rotary_base: float) -> None:
        super().__init__()
        self.rotary_dim = int(kv_channels * rotary_percent)
        self.rotary_base = rotary_base

    def forward(
        self,
        position_ids: Tensor,
        mrope_section: Sequence[int],
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> Tensor:
        """``position_ids`` ``[3, b, s]`` -> rotary angles ``[s, b, 1, rotary_dim]`` (halves equal,
        the non-interleaved pairing ``rotate_half`` expects)."""
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("interleaved mRoPE under context parallelism")
        half = self.rotary_dim // 2
        if sum(mrope_section) != half:
            raise ValueError(
                f"mrope_section {list(mrope_section)} must sum to half the rotary dim ({half})"
            )
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.rotary_base ** (steps / self.rotary_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [3, b, s, half]
        axes = torch.tensor(frequency_axes(mrope_section), device=position_ids.device)
        chosen = freqs.gather(0, axes.expand(1, *freqs.shape[1:])).squeeze(0)  # [b, s, half]
        return torch.cat([chosen, chosen], dim=-1).transpose(0, 1)[:, :, None, :].contiguous()


class PositionedMRoPE(nn.Module):
    """:class:`InterleavedMRoPE` for megatron-core's HybridModel, which has no multimodal rotary
    mode: it asks its rotary module for the angles of a sequence length (plain RoPE's call). This
    module answers that call with the interleaved angles of the positions the VL model set for the
    forward under way (:meth:`positions`), so the decoder and the MTP layers get what GPTModel's
    ``mrope`` mode would give them."""

    def __init__(self, rotary: InterleavedMRoPE, mrope_section: Sequence[int]) -> None:
        super().__init__()
        self.rotary = rotary
        self.mrope_section = list(mrope_section)
        self._position_ids: Tensor | None = None

    @contextmanager
    def positions(self, position_ids: Tensor) -> Iterator[None]:
        """Within the block, the model's rotary angles are those of ``position_ids`` ``[3, b, s]``."""
        self._position_ids = position_ids
        try:
            yield
        finally:
            self._position_ids = None

    def get_rotary_seq_len(self, *_args: object, **_kwargs: object) -> int:
        return self._held().shape[-1]

    def forward(self, _seq_len: int, packed_seq: bool = False) -> Tensor:
        if packed_seq:
            raise NotImplementedError("interleaved mRoPE on packed sequences")
        return self.rotary(self._held(), self.mrope_section)

    def _held(self) -> Tensor:
        if self._position_ids is None:
            raise RuntimeError(
                "the multimodal positions are set by the VL model's forward (PositionedMRoPE.positions)"
            )
        return self._position_ids


def position_ids(
    mm_token_type_ids: Tensor,
    *,
    spatial_merge_size: int,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
) -> Tensor:
    """The ``[3, b, s]`` mRoPE positions of a batch whose token types are ``mm_token_type_ids``
    (TEXT, IMAGE or VIDEO placeholder per token).

    Each run of image placeholders is the next image of ``image_grid_thw``; a video counts one
    run per frame (a video's frames are separated by timestamp text in Qwen3.5 prompts). Grids are
    in patches; the language model sees them merged by ``spatial_merge_size``.
    """
    if mm_token_type_ids.dim() != 2:
        raise ValueError(
            f"mm_token_type_ids must be [batch, seq], got {list(mm_token_type_ids.shape)}"
        )
    unknown = set(mm_token_type_ids.unique().tolist()) - {TEXT, IMAGE, VIDEO}
    if unknown:
        raise ValueError(
            f"mm_token_type_ids holds {sorted(unknown)}: expected 0 (text), 1 (image), 2 (video)"
        )
    frames = _frames(video_grid_thw)
    grids = {IMAGE: _rows(image_grid_thw), VIDEO: iter(frames)}
    out = torch.zeros(3, *mm_token_type_ids.shape, dtype=torch.long)
    for row, types in enumerate(mm_token_type_ids.tolist()):
        out[:, row] = _row_positions(types, grids, spatial_merge_size, row)
    for kind, left in grids.items():
        extra = sum(1 for _ in left)
        if extra:
            raise ValueError(
                f"{extra} {_KIND_NAMES[kind]} grid(s) have no placeholder run in the prompt"
            )
    return out


def _rows(grid_thw: Tensor | None) -> Iterator[tuple[int, int, int]]:
    return iter([] if grid_thw is None else [tuple(g) for g in grid_thw.tolist()])


def _frames(video_grid_thw: Tensor | None) -> list[tuple[int, int, int]]:
    """Each video's frames as grids of one temporal patch."""
    return [
        (1, h, w)
        for t, h, w in ([] if video_grid_thw is None else video_grid_thw.tolist())
        for _ in range(t)
    ]


def _runs(types: list[int]) -> Iterator[tuple[int, int, int]]:
    """``(kind, start, end)`` of each maximal run of equal token types."""
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            yield types[start], start, i
            start = i


def _row_positions(
    types: list[int], grids: dict[int, Iterator[tuple[int, int, int]]], merge: int, row: int
) -> Tensor:
    pieces, start_pos = [], 0
    for kind, start, end in _runs(types):
        if kind == TEXT:
            pieces.append(torch.arange(start_pos, start_pos + end - start).expand(3, -1))
            start_pos += end - start
            continue
        grid = next(grids[kind], None)
        if grid is None:
            raise ValueError(
                f"row {row}: the {_KIND_NAMES[kind]} run at token {start} has no grid left"
            )
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        if end - start != t * h * w:
            raise ValueError(
                f"row {row}: the {_KIND_NAMES[kind]} run at token {start} has {end - start} tokens, "
                f"but its grid {list(grid)} merges to {t * h * w}"
            )
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
        )
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start_pos)
        start_pos += max(h, w)
    return torch.cat(pieces, dim=1)
