"""CLIP's text tower (open_clip ``TextTransformer`` / the text half of ``CLIP``) built from trim.nn.

token embedding + position embedding -> pre-norm blocks under a causal additive mask ->
``ln_final`` over every token -> the pooled token (by default the end-of-text token, found
as open_clip finds it: the argmax of the token ids, since EOT has the largest id in CLIP's
vocabulary) -> ``text_projection``.

The blocks run in a `TrimmedStack`, so the tower accepts every trimming mode and optional
text token / head trimmers (``TrimConfig.text_*_layers``). The causal mask is built per
forward over the tokens a block actually carries: trim gathers kept tokens in their
original order, so "attend to earlier carried tokens" is the original causal mask
restricted to the kept tokens, in both the masked and the physical layout. The first
token (start-of-text) and the pooled token are protected and never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trim.errors import ConfigError
from trim.models.config import TrimConfig
from trim.models.streams import TEXT
from trim.models.towers import make_trimmers
from trim.nn import PreNormBlock
from trim.nn.tokens import Packing
from trim.prune import CostMeter, LayerRecord, TrimmedStack, start_tokens

TEXT_POOLS = ("argmax", "eos", "first", "last")


@dataclass
class ClipTextConfig:
    """CLIP text transformer (pre-norm, causal). Defaults are ViT-B-32's text tower."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"  # "quick_gelu" for the OpenAI weights
    eps: float = 1e-5
    output_dim: int | None = 512  # width of text_projection; None = no projection
    proj_bias: bool = False
    causal: bool = True  # False: bi-directional (e.g. CLIPA's text tower)
    pool: str = "argmax"  # which token is the text's feature: argmax id (EOT), eos id, first, last
    eos_id: int = 2  # only read when pool == "eos"

    def __post_init__(self) -> None:
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"ClipTextConfig.pool={self.pool!r}; choose one of {TEXT_POOLS}")


def causal_bias(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 1, n, n) additive mask: 0 on and below the diagonal, -inf above (no attending ahead)."""
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]


class CausalPreNormBlock(PreNormBlock):
    """A `PreNormBlock` whose attention is causal over the tokens it is given (in their order)."""

    def forward(self, x: Tensor, *, keep: Tensor | None = None, head_mask: Tensor | None = None,
                heads: Tensor | None = None, attn_bias: Tensor | None = None, packing: Packing | None = None,
                head_keep: Tensor | None = None) -> Tensor:
        if packing is not None or head_keep is not None:
            raise ValueError("a causal block runs in the padded layout (start_tokens(..., layout='padded'))")
        mask = causal_bias(x.shape[1], x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        bias = mask if attn_bias is None else attn_bias + mask
        return super().forward(x, keep=keep, head_mask=head_mask, heads=heads, attn_bias=bias)


class ClipTextOutput(NamedTuple):
    features: Tensor  # (B, output_dim): the pooled token through text_projection (open_clip's encode_text)
    pooled: Tensor  # (B, width): the pooled token after ln_final, before the projection
    tokens: Tensor  # (B, N, width): every token after ln_final (dropped tokens carry their last value)


class ClipTextTower(nn.Module):
    """CLIP text encoder; ``forward(input_ids, trim=...)`` -> `ClipTextOutput`."""

    def __init__(self, cfg: ClipTextConfig, trim: TrimConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        trim = trim or TrimConfig()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        block = CausalPreNormBlock if cfg.causal else PreNormBlock
        blocks = [block(cfg.width, cfg.heads, cfg.mlp_ratio, act=cfg.act, eps=cfg.eps) for _ in range(cfg.layers)]
        if trim.policy == "evit" and trim.text_token_layers and (cfg.causal or cfg.pool != "first"):
            raise ConfigError("model.trim.policy='evit' ranks tokens by the attention of the [CLS] token the model "
                              f"pools, but this CLIP text tower pools its {cfg.pool!r} token"
                              f"{' under a causal mask' if cfg.causal else ''}; drop model.trim.text_token_layers "
                              "or choose another objective.method")
        tok, head = make_trimmers(cfg.width, cfg.heads, trim.text_token_layers, trim.text_head_layers, trim, None,
                                  TEXT)
        self.stack = TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = (nn.Linear(cfg.width, cfg.output_dim, bias=cfg.proj_bias)
                                if cfg.output_dim else None)

    def pool_index(self, input_ids: Tensor) -> Tensor:
        """(B,) position of the token each text is pooled from."""
        b, n = input_ids.shape
        if self.cfg.pool == "argmax":
            return input_ids.argmax(-1)
        if self.cfg.pool == "eos":
            return (input_ids == self.cfg.eos_id).int().argmax(-1)
        first = 0 if self.cfg.pool == "first" else n - 1
        return torch.full((b,), first, dtype=torch.long, device=input_ids.device)

    def forward(self, input_ids: Tensor, *, trim: str = "off", tau: float = 1.0, meter: CostMeter | None = None,
                records: list[LayerRecord] | None = None) -> ClipTextOutput:
        b, n = input_ids.shape
        if n > self.cfg.context_length:
            raise ValueError(f"text of {n} tokens exceeds the CLIP context_length={self.cfg.context_length}; "
                             f"tokenize with context_length={self.cfg.context_length}")
        x = self.token_embedding(input_ids)
        x = x + self.positional_embedding[:n].to(x.dtype)
        at = self.pool_index(input_ids)
        rows = torch.arange(b, device=input_ids.device)
        protect = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
        protect[:, 0] = True  # start-of-text: with a causal mask every token attends to it
        protect[rows, at] = True
        # Packed attention has no causal mask (text is short; the image tower is where packing pays).
        layout = "padded" if self.cfg.causal else "packed"
        tokens = self.stack(start_tokens(x, trim, protect=protect, layout=layout), mode=trim, tau=tau, meter=meter,
                            records=records)
        x = self.ln_final(tokens.restore())
        pooled = x[rows, at]
        features = pooled if self.text_projection is None else self.text_projection(pooled)
        return ClipTextOutput(features, pooled, x)
