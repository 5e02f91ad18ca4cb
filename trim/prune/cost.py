"""Analytic FLOPs of trim's blocks for given kept tokens and heads.

Counted as `torch.utils.flop_counter` counts them: 2 FLOPs per multiply-accumulate of every
matrix product (projections, attention scores, attention-weighted values, MLP); element-wise
work (norms, softmax, activations) is not counted. For one sample with ``n`` query tokens,
``m`` key tokens, ``h`` kept heads of width ``d_h``, model width ``D``, key width ``D_kv``
and MLP width ``F``:

    attention = 2 n D h d_h            (q)        + 4 m D_kv h d_h   (k, v)
              + 4 h n m d_h            (scores, weighted values) + 2 n h d_h D (output)
    mlp       = 4 n D F
    rel-pos   = 2 h n d_h (2 rows - 1 + 2 cols - 1)   (SAM's decomposed bias over a rows x cols grid)
    conv      = 2 H_out W_out C_out (C_in / groups) k_h k_w

A windowed block (SAM) attends within windows of S slots, padding included, so its attention is
counted per window and its MLP per token; big.LITTLE's routed blocks (`router_flops`) add the
predictor (2 D per token), the P-block on the selected queries over every key and the narrow
E-block on every token.

Counts may be float tensors: expected kept counts from soft keep probabilities give a
differentiable expected cost, which is what the cost loss trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trim.nn.attention import Attention
from trim.nn.blocks import CrossBlock, LittleBlock, PostNormBlock, PreNormBlock, WindowBlock
from trim.nn.mlp import Mlp
from trim.nn.tokens import Packing
from trim.prune.random_keep import RandomTokenTrimmer
from trim.prune.static_heads import StaticHeadGate
from trim.prune.routing import BigLittleRouter
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer

Count = Tensor | float | int


def attention_flops(attn: Attention, n: Count, heads: Count, m: Count | None = None,
                    pairs: Count | None = None) -> Count:
    """``pairs``: query-key pairs the core computes, when not ``n m`` (a padded packed core)."""
    # The four terms of the docstring share 4 h d_h: 4 h d_h (n D + m D_kv + n m). Factored so
    # that tensor counts (training) cost a handful of tensor ops per layer, not one per factor.
    per_head = 4 * attn.head_dim * heads
    m = n if m is None else m
    pairs = n * m if pairs is None else pairs
    return per_head * (n * attn.dim + m * attn.kv_dim + pairs)


def mlp_flops(mlp: Mlp, n: Count) -> Count:
    return n * (4 * mlp.fc1.in_features * mlp.fc1.out_features)


def rel_pos_flops(attn: Attention, n: Count) -> Count:
    """The decomposed relative-position bias of ``n`` queries (every query against each axis' table)."""
    if attn.rel_pos is None:
        return 0
    rows, cols = attn.rel_pos.size
    return 2 * attn.num_heads * attn.head_dim * n * (2 * rows - 1 + 2 * cols - 1)


def grid_attention_flops(attn: Attention, groups: Count, n: Count, queries: Count | None = None) -> Count:
    """``groups`` attention calls (windows, images) of ``queries`` (default ``n``) over ``n`` keys, bias included."""
    q = n if queries is None else queries
    return groups * (attention_flops(attn, q, attn.num_heads, n) + rel_pos_flops(attn, q))


def window_block_flops(block: WindowBlock, groups: Count, n: Count, mlp_tokens: Count | None = None) -> Count:
    """A `WindowBlock` attending in ``groups`` groups of ``n`` tokens; its MLP runs on ``mlp_tokens``
    (default every token of the groups; the grid tokens only when it runs on the unpadded grid)."""
    tokens = groups * n if mlp_tokens is None else mlp_tokens
    return grid_attention_flops(block.attn, groups, n) + mlp_flops(block.mlp, tokens)


def little_block_flops(little: LittleBlock, groups: Count, n: Count) -> Count:
    tokens = groups * n
    maps = 4 * little.down.in_features * little.down.out_features * tokens  # down and up
    return grid_attention_flops(little.attn, groups, n) + maps + mlp_flops(little.mlp, tokens)


def router_flops(router: BigLittleRouter, big: WindowBlock, groups: Count, n: Count) -> Count:
    """A routed block on ``groups`` groups of ``n`` alive tokens: predictor + P-block on the top
    ceil(share n) queries (over all n keys) + E-block on every token."""
    raw = router.share * n
    k = raw + (torch.ceil(raw) - raw).detach() if isinstance(raw, Tensor) else math.ceil(raw)
    predictor = 2 * router.predictor.in_features * groups * n
    big_part = grid_attention_flops(big.attn, groups, n, queries=k) + mlp_flops(big.mlp, groups * k)
    return predictor + big_part + little_block_flops(router.little, groups, n)


def conv_flops(conv: nn.Conv2d, height: int, width: int) -> int:
    """A convolution producing a ``height`` x ``width`` map."""
    kh, kw = conv.kernel_size
    return 2 * height * width * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def block_flops(block: nn.Module, n: Count, heads: Count | None = None, *,
                context_n: Count | None = None, cross_heads: Count | None = None, pairs: Count | None = None,
                cross_pairs: Count | None = None) -> Count:
    """FLOPs of one block for ``n`` tokens (and ``context_n`` keys for a cross block); ``pairs`` /
    ``cross_pairs``: the attention cores' query-key pairs when they run padded (`core_pairs`)."""
    if isinstance(block, (PreNormBlock, PostNormBlock)):
        h = block.attn.num_heads if heads is None else heads
        return attention_flops(block.attn, n, h, pairs=pairs) + mlp_flops(block.mlp, n)
    if isinstance(block, CrossBlock):
        if context_n is None:
            raise ValueError("a CrossBlock's cost needs context_n, the other stream's token count")
        h = block.self_attn.num_heads if heads is None else heads
        hc = block.cross_attn.num_heads if cross_heads is None else cross_heads
        return (attention_flops(block.self_attn, n, h, pairs=pairs)
                + attention_flops(block.cross_attn, n, hc, context_n, pairs=cross_pairs) + mlp_flops(block.mlp, n))
    raise TypeError(f"no cost model for {type(block).__name__}; add one to trim/prune/cost.py")


def core_pairs(attn: Attention, packing: Packing | None, context_packing: Packing | None = None,
               head_keep: Tensor | None = None) -> Tensor | None:
    """(B,) query-key pairs a packed attention core computes per sample when it runs as one padded
    call (`Attention.pads_core`: each sample then pays the batch's longest), else None (``n m``)."""
    if packing is None or head_keep is not None:
        return None
    context = context_packing or packing
    if not attn.pads_core(packing, context):
        return None
    return torch.full((len(packing.lengths),), float(packing.max_length * context.max_length),
                      device=packing.offsets.device)


def token_trimmer_flops(trimmer: TokenTrimmer | RandomTokenTrimmer, n: Count) -> Count:
    if isinstance(trimmer, RandomTokenTrimmer):  # random scores: no matrix product
        return 0
    hidden = trimmer.local.out_features
    per_sample = 2 * trimmer.global_proj.in_features * hidden
    if trimmer.cross is not None:
        per_sample += 2 * trimmer.cross.in_features * hidden
    return n * (2 * trimmer.local.in_features * hidden + 2 * hidden) + per_sample


def first_token_attention_flops(attn: Attention, n: Count) -> Count:
    """EViT's overhead for ``n`` tokens: the first token's query (2 D h d_h), every key
    (2 n D h d_h), its scores (2 n h d_h) and the fusion of the dropped tokens (at most 2 n D)."""
    inner = attn.num_heads * attn.head_dim
    return 2 * attn.dim * inner + n * (2 * attn.kv_dim * inner + 2 * inner + 2 * attn.dim)


def head_trimmer_flops(trimmer: HeadTrimmer | StaticHeadGate) -> int:
    if isinstance(trimmer, StaticHeadGate):  # logits shared by every input: nothing computed per input
        return 0
    hidden = trimmer.global_proj.out_features
    cross = 2 * trimmer.cross.in_features * hidden if trimmer.cross is not None else 0
    return 2 * trimmer.global_proj.in_features * hidden + cross + 2 * hidden * trimmer.num_heads


@dataclass
class CostMeter:
    """Per-sample FLOPs of a forward pass, trimmed and untrimmed, summed over every stack.

    ``ratio()`` is the model-level cost ratio (1.0 = nothing saved). In training the
    trimmed side is an expectation under the keep probabilities, so it carries gradients.
    ``sample_ratio()`` is what each sample needs on its own (its kept tokens and heads): the same
    as ``ratio()`` except where a batch runs more than its samples kept (padding to the batch's
    longest, the union of its heads, every head of a small packed layer).
    """

    trimmed: list[Tensor] = field(default_factory=list)
    full: list[Tensor] = field(default_factory=list)
    own: list[Tensor] = field(default_factory=list)

    def add(self, trimmed: Count, full: Count, batch: int, device: torch.device | None = None, *,
            own: Count | None = None) -> None:
        """``own``: each sample's own FLOPs when the batch ran more (``trimmed``) than it kept."""
        def column(value: Count) -> Tensor:
            return torch.as_tensor(value, dtype=torch.float32, device=device).expand(batch).float()

        self.trimmed.append(column(trimmed))
        self.full.append(column(full))
        self.own.append(self.trimmed[-1] if own is None else column(own))

    def ratio(self) -> Tensor:
        """(B,) trimmed / full FLOPs per sample."""
        if not self.full:
            raise RuntimeError("CostMeter is empty: run a forward pass through a trimmed stack first")
        return torch.stack(self.trimmed).sum(0) / torch.stack(self.full).sum(0)

    def sample_ratio(self) -> Tensor:
        """(B,) each sample's own FLOPs (what it kept) / full FLOPs."""
        if not self.full:
            raise RuntimeError("CostMeter is empty: run a forward pass through a trimmed stack first")
        return torch.stack(self.own).sum(0) / torch.stack(self.full).sum(0)
