"""Prunable building blocks: attention, MLP, blocks, token-set helpers."""

from trim.nn.attention import Attention, DecomposedRelPos, SliceableLinear
from trim.nn.blocks import CrossBlock, PostNormBlock, PreNormBlock, WindowBlock, gate
from trim.nn.mlp import Mlp
from trim.nn.tokens import TokenSet, compact, gather_tokens
from trim.nn.windows import grid_positions, window_partition, window_unpartition

__all__ = ["Attention", "CrossBlock", "DecomposedRelPos", "Mlp", "PostNormBlock", "PreNormBlock", "SliceableLinear",
           "TokenSet", "WindowBlock", "compact", "gather_tokens", "gate", "grid_positions", "window_partition",
           "window_unpartition"]
