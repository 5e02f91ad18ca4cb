"""Single-stream VL model in the ViLT form, with SmartTrim's trimmers.

[text embeddings + type 0 ; image CLS + patches + position + type (1 + image index)] go
through one pre-norm transformer, a final LayerNorm and a pooler on the first token.

Token trimmers prune image patches only: text is short and carries the question, and the
patches are where the compute is. Each image token is scored against the mean of the
alive image tokens (own modality) and the mean of the text tokens (other modality), both
read from the current layer. Head trimmers condition on the image mean and the text mean.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.models.base import TrimModel
from trim.models.streams import VILT
from trim.models.config import ModelConfig
from trim.models.heads import Pooler, make_head
from trim.models.towers import PatchEmbed, TextEmbeddings, make_trimmers
from trim.nn import PreNormBlock, TokenSet
from trim.prune import CostMeter, LayerRecord, TrimmedStack, start_tokens

TEXT, IMAGE = 0, 1


class ViltModel(TrimModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg.validate()
        v, t = cfg.vision, cfg.trim
        if cfg.text.width != v.width:
            raise ValueError(f"ViLT is one stream: model.text.width={cfg.text.width} must equal "
                             f"model.vision.width={v.width}")
        self.text_embeddings = TextEmbeddings(cfg.text)
        self.patch_embed = PatchEmbed(v)
        self.modality_embeddings = nn.Embedding(cfg.max_images + 1, v.width)
        blocks = [PreNormBlock(v.width, v.heads, v.mlp_ratio, act=v.act, eps=v.eps, fused_qkv=False)
                  for _ in range(v.layers)]
        tok, head = make_trimmers(v.width, v.heads, t.vision_token_layers, t.vision_head_layers, t, v.width, VILT)
        self.stack = TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head)
        self.norm = nn.LayerNorm(v.width, eps=v.eps)
        self.pooler = Pooler(v.width)
        hidden = 2 * v.width if cfg.task == "vqa" else v.width * cfg.max_images
        self.head = make_head(cfg.task, v.width, cfg.num_labels, hidden, images=cfg.max_images)

    @staticmethod
    def _condition(tokens: TokenSet) -> tuple[Tensor, Tensor]:
        return tokens.mean(IMAGE), tokens.mean(TEXT)

    def encode(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, *, mode: str, tau: float,
               meter: CostMeter, records: dict[str, list[LayerRecord]], track_alive: bool,
               image_index: int = 0, layout: str = "packed", prefix: dict[str, Tensor] | None = None,
               resume: dict[str, Tensor] | None = None) -> Tensor:
        # Shares no prefix yet: ``prefix`` stays empty, so its teacher runs whole (no ``resume``).
        # Modality rows through the Embedding's forward (not .weight[i]) so hooks and ZeRO-3 see the read.
        modality = self.modality_embeddings(torch.tensor([0, 1 + image_index], device=input_ids.device))
        text = self.text_embeddings(input_ids) + modality[0]
        image = self.patch_embed(pixels) + modality[1]
        b, nt, ni = text.shape[0], text.shape[1], image.shape[1]
        x = torch.cat([text, image], 1)
        valid = torch.cat([attention_mask.bool(), torch.ones(b, ni, dtype=torch.bool, device=x.device)], 1)
        # Text tokens and the image CLS are never pruned: only patches are.
        protect = torch.ones_like(valid)
        protect[:, nt + 1:] = False
        segment = torch.cat([torch.full((b, nt), TEXT), torch.full((b, ni), IMAGE)], 1).to(x.device)
        tokens = start_tokens(x, mode, valid=valid, protect=protect & valid, segment=segment, layout=layout)
        tokens = self.stack(tokens, mode=mode, tau=tau, meter=meter, records=records.setdefault(VILT, []),
                            condition=self._condition, track_alive=track_alive)
        return self.pooler(self.norm(tokens.first()))  # LayerNorm is per token: only [CLS] is needed
