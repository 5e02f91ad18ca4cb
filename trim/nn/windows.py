"""Windowed attention layout (ViTDet / SAM): a (B, H, W, C) token grid <-> (B * windows, size², C).

Each function does one move, so a pruning method can sit between them: window-wise token
trimming gathers the kept tokens of every window after `window_partition` (the same count in
each window keeps the tensor rectangular) and scatters them back before `window_unpartition`;
`grid_positions` gives the (row, col) of every token, which the decomposed relative-position
bias (`trim.nn.attention.DecomposedRelPos`) reads, gathered for whatever tokens are kept.

A grid that does not divide by the window size is padded with zero tokens at its bottom and
right. The padding takes part in attention as keys (as in SAM: it is padded after the norm,
so its keys and values are the projection biases) and is cut off again when unpartitioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def padded_size(size: int, window: int) -> int:
    """``size`` rounded up to whole windows."""
    return -(-size // window) * window


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B * nH * nW, window², C), windows in row-major order, zero-padded to whole windows."""
    b, h, w, c = x.shape
    hp, wp = padded_size(h, window), padded_size(w, window)
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_unpartition(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B * nH * nW, window², C) -> (B, height, width, C), padding removed."""
    hp, wp = padded_size(height, window), padded_size(width, window)
    nh, nw = hp // window, wp // window
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    return x[:, :height, :width] if (hp, wp) != (height, width) else x


def grid_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(height * width, 2) long: the (row, col) of each token of a row-major grid."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], -1)
