"""Uni-modal towers assembled from trim.nn: a ViT/CLIP vision tower and a BERT/RoBERTa text tower."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.models.config import TextConfig, TrimConfig, VisionConfig
from trim.models.streams import TEXT, VISION
from trim.nn import PostNormBlock, PreNormBlock
from trim.prune import Trimmer, TrimmedStack, head_trimmer, token_trimmer


def make_trimmers(width: int, heads: int, token_layers: list[int], head_layers: list[int], trim: TrimConfig,
                  other_dim: int | None, stream: str) -> tuple[dict[int, Trimmer], dict[int, Trimmer]]:
    """The token and head trimmers ``trim.policy`` places on one stack of ``stream``."""
    tok = {i: token_trimmer(trim.policy, width, other_dim, hidden=trim.hidden, min_keep=trim.min_keep_tokens,
                            init_logit=trim.init_keep_logit, name=f"{stream}/{i}") for i in token_layers}
    head = {i: head_trimmer(trim.policy, width, heads, other_dim, hidden=trim.hidden, min_keep=trim.min_keep_heads,
                            init_logit=trim.init_keep_logit) for i in head_layers}
    return tok, {i: h for i, h in head.items() if h is not None}


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convs (16, 32, ... channels, each normalised + GELU), then a
    1x1 conv to the width: the same token grid as a patch projection.

    A linear patch projection trained from scratch on a small dataset learns colours but not
    shapes (a probe of the tiny model's patch tokens told shapes apart no better than
    chance); a few convolutions give each token a view of edges and corners first (Xiao et
    al., "Early convolutions help transformers see better", 2021). GroupNorm with one group
    (a LayerNorm over C, H, W) rather than BatchNorm: it has no running statistics, so a
    sample's tokens never depend on its batch.
    """
    layers: list[nn.Module] = []
    channels = cfg.channels
    for i in range(cfg.patch_size.bit_length() - 1):
        out = min(16 * 2**i, cfg.width)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, out), nn.GELU()]
        channels = out
    layers.append(nn.Conv2d(channels, cfg.width, 1, bias=cfg.patch_bias))
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    """Image -> [CLS] + patch tokens + position embeddings."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.stem == "conv":
            self.proj = conv_stem(cfg)
        else:
            self.proj = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        return x + self.pos_embed.to(x.dtype)


class VisionTower(nn.Module):
    """Pre-norm ViT / CLIP visual encoder whose layers can carry trimmers.

    Token trimmers here are cross-modal: they condition on the text's pooled feature,
    which is why the cheap text tower runs first.
    """

    def __init__(self, cfg: VisionConfig, trim: TrimConfig, text_dim: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.ln_pre else nn.Identity()
        blocks = [PreNormBlock(cfg.width, cfg.heads, cfg.mlp_ratio, act=cfg.act, eps=cfg.eps) for _ in range(cfg.layers)]
        tok, head = make_trimmers(cfg.width, cfg.heads, trim.vision_token_layers, trim.vision_head_layers, trim, text_dim,
                                  VISION)
        self.stack = TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.ln_post else nn.Identity()

    def embed_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded tokens and the protect mask (`vision_protect`)."""
        x = self.ln_pre(self.embed(pixels))
        return x, vision_protect(x)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def position_ids(self, input_ids: Tensor) -> Tensor:
        if self.cfg.roberta_positions:
            not_pad = (input_ids != self.cfg.pad_token_id).long()
            return torch.cumsum(not_pad, 1) * not_pad + self.cfg.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        # RoBERTa numbers positions from pad_token_id + 1, so it has that many fewer.
        usable = self.cfg.max_positions - (self.cfg.pad_token_id + 1 if self.cfg.roberta_positions else 0)
        if input_ids.shape[1] > usable:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds the {usable} positions of this text "
                             f"tower; truncate it in the data loader (max_text_len)")
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
             + self.token_type_embeddings(types))
        return self.norm(x)


class TextTower(nn.Module):
    """Post-norm BERT / RoBERTa encoder."""

    def __init__(self, cfg: TextConfig, trim: TrimConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        blocks = [PostNormBlock(cfg.width, cfg.heads, cfg.mlp_ratio, act=cfg.act, eps=cfg.eps) for _ in range(cfg.layers)]
        tok, head = make_trimmers(cfg.width, cfg.heads, trim.text_token_layers, trim.text_head_layers, trim, None, TEXT)
        self.stack = TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head)


def vision_protect(x: Tensor) -> Tensor:
    """(B, N) bool for (B, N, D) image tokens: the CLS token is never pruned."""
    protect = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    protect[:, 0] = True
    return protect


def text_protect(attention_mask: Tensor) -> Tensor:
    """[CLS] and the last real token ([SEP] / </s>) of each text are never pruned."""
    protect = torch.zeros_like(attention_mask, dtype=torch.bool)
    protect[:, 0] = True
    last = attention_mask.long().sum(1).clamp_min(1) - 1
    protect[torch.arange(len(last)), last] = True
    return protect & attention_mask.bool()
