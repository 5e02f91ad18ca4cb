"""Prunable building blocks: attention, MLP, blocks, token-set helpers."""

from trim.nn.attention import Attention, DecomposedRelPos, SliceableLinear
from trim.nn.blocks import CrossBlock, LittleBlock, PostNormBlock, PreNormBlock, WindowBlock, gate
from trim.nn.mlp import Mlp
from trim.nn.tokens import TokenSet, compact, gather_tokens
from trim.nn.slots import AttentionGroups, WindowSlots
from trim.nn.windows import WindowGeometry, grid_positions, window_partition, window_unpartition

__all__ = ["Attention", "AttentionGroups", "CrossBlock", "DecomposedRelPos", "LittleBlock", "Mlp", "PostNormBlock",
           "PreNormBlock", "SliceableLinear", "TokenSet", "WindowBlock", "WindowGeometry", "WindowSlots", "compact",
           "gather_tokens", "gate", "grid_positions", "window_partition", "window_unpartition"]
