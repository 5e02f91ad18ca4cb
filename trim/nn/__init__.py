"""Prunable building blocks: attention, MLP, blocks, token-set helpers."""

from trim.nn.attention import Attention, SliceableLinear
from trim.nn.blocks import CrossBlock, PostNormBlock, PreNormBlock, gate
from trim.nn.mlp import Mlp
from trim.nn.tokens import TokenSet, compact, gather_tokens

__all__ = ["Attention", "CrossBlock", "Mlp", "PostNormBlock", "PreNormBlock", "SliceableLinear", "TokenSet", "compact",
           "gather_tokens", "gate"]
