"""Dual-stream VL model in the METER / BridgeTower form, with SmartTrim's trimmers.

text tower -> (pooled text conditions the vision tower's token trimmers) -> vision tower
-> project both streams to the cross width, add token-type embeddings -> co-attention
layers (each stream: self-attention, cross-attention to the other stream, MLP) with token
and head trimmers on both streams, each conditioned on the other stream -> [CLS] poolers.

BridgeTower (``bridge_layers`` set): cross layer 0 reads uni-modal layer
``bridge_layers[0]``; cross layer j > 0 reads LayerNorm(projected uni-modal layer
``bridge_layers[j]`` + cross layer j-1's output) — the "bridges". A token the vision tower
pruned enters a bridge with its last value, as dense tasks get it back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.models.base import TrimModel
from trim.models.streams import CROSS_IMAGE, CROSS_TEXT, TEXT, VISION
from trim.models.config import ModelConfig
from trim.models.heads import Pooler, make_head
from trim.models.towers import TextTower, VisionTower, text_protect, vision_protect
from trim.nn import CrossBlock, TokenSet
from trim.prune import CostMeter, LayerRecord, Trimmer, block_flops, head_trimmer, start_tokens, token_trimmer
from trim.prune.cost import core_pairs
from trim.prune.stack import token_cost, trim_heads, trim_tokens

CROSS_TRIMMERS = ("text_tokens", "image_tokens", "text_self_heads", "text_cross_heads", "image_self_heads",
                  "image_cross_heads")


class DualStreamModel(TrimModel):
    task_modules = ("head", "pair_type_embeddings")  # new when the source model had another task

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg.validate()
        w, t = cfg.cross_width, cfg.trim
        self.text = TextTower(cfg.text, t)
        self.vision = VisionTower(cfg.vision, t, text_dim=cfg.text.width)
        self.text_transform = nn.Linear(cfg.text.width, w)
        self.image_transform = nn.Linear(cfg.vision.width, w)
        self.token_type_embeddings = nn.Embedding(2, w)
        # NLVR2: each image of the pair is encoded with the statement on its own, so each encoding must
        # know which image it reads ("the left image ..."). As METER (one token type per image, image
        # 2's started from image 1's), image k adds its own row, zero at the start.
        self.pair_type_embeddings = nn.Embedding(cfg.max_images, w) if cfg.task == "nlvr2" else None
        if self.pair_type_embeddings is not None:
            nn.init.zeros_(self.pair_type_embeddings.weight)
        bridged = bool(cfg.bridge_layers)
        eps = cfg.text.eps
        # BridgeTower normalises the first cross inputs and fuses later ones with LayerNorm(a + b).
        self.text_input_norm = nn.LayerNorm(w, eps=eps) if bridged else nn.Identity()
        self.image_input_norm = nn.LayerNorm(w, eps=eps) if bridged else nn.Identity()
        links = cfg.cross_layers - 1 if bridged else 0
        self.text_links = nn.ModuleList(nn.LayerNorm(w, eps=eps) for _ in range(links))
        self.image_links = nn.ModuleList(nn.LayerNorm(w, eps=eps) for _ in range(links))
        self.text_layers = nn.ModuleList(
            CrossBlock(w, cfg.cross_heads, cfg.text.mlp_ratio, context_dim=w, act=cfg.text.act, eps=eps) for _ in range(cfg.cross_layers))
        self.image_layers = nn.ModuleList(
            CrossBlock(w, cfg.cross_heads, cfg.text.mlp_ratio, context_dim=w, act=cfg.text.act, eps=eps) for _ in range(cfg.cross_layers))
        self.cross_trimmers = nn.ModuleDict({name: nn.ModuleDict() for name in CROSS_TRIMMERS})
        for i in t.cross_token_layers:
            for name in ("text_tokens", "image_tokens"):
                self.cross_trimmers[name][str(i)] = token_trimmer(t.policy, w, w, hidden=t.hidden,
                                                                  min_keep=t.min_keep_tokens,
                                                                  init_logit=t.init_keep_logit, name=f"{name}/{i}")
        for i in t.cross_head_layers:
            for name in CROSS_TRIMMERS[2:]:
                trimmer = head_trimmer(t.policy, w, cfg.cross_heads, w, hidden=t.hidden, min_keep=t.min_keep_heads,
                                       init_logit=t.init_keep_logit)
                if trimmer is not None:  # token-only baselines keep every head
                    self.cross_trimmers[name][str(i)] = trimmer
        self.text_pooler, self.image_pooler = Pooler(w), Pooler(w)
        self.head = make_head(cfg.task, 2 * w, cfg.num_labels, 2 * w)

    def _trimmer(self, name: str, layer: int) -> Trimmer | None:
        group = self.cross_trimmers[name]
        return group[str(layer)] if str(layer) in group else None

    def _type_embedding(self, like: Tensor, image: int | None) -> Tensor:
        """The token-type embedding, (D,), of the text (``image`` None) or of the ``image``-th image of
        the sample, through the Embeddings' forward (so hooks and ZeRO-3 see the read)."""
        emb = self.token_type_embeddings(torch.tensor(int(image is not None), device=like.device))
        if image is not None and self.pair_type_embeddings is not None:
            emb = emb + self.pair_type_embeddings(torch.tensor(image, device=like.device))
        return emb

    def _bridge(self, uni: TokenSet, stream: TokenSet, image: int | None) -> Tensor:
        """A uni-modal layer's output at the cross stream's tokens, projected to the cross width
        (``image``: None for the text, else the image's index in the sample)."""
        x = stream.take(uni.restore())
        if image is not None:
            return self.image_transform(self.vision.ln_post(x)) + self._type_embedding(x, image)
        return self.text_transform(x) + self._type_embedding(x, None)

    def encode(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, *, mode: str, tau: float,
               meter: CostMeter, records: dict[str, list[LayerRecord]], track_alive: bool,
               image_index: int = 0, layout: str = "packed", prefix: dict[str, Tensor] | None = None,
               resume: dict[str, Tensor] | None = None) -> Tensor:
        """``prefix`` receives each tower's values after the blocks before its first trimmer
        (embeddings included), ``resume`` starts each tower from them (`TrimmedStack.forward`).
        BridgeTower's bridges read every tower layer's output, so a bridged model shares none."""
        cfg = self.config
        bridged = bool(cfg.bridge_layers)
        text_outs: list[TokenSet] | None = [] if bridged else None
        image_outs: list[TokenSet] | None = [] if bridged else None
        resume = None if bridged else resume
        share = prefix is not None and not bridged
        text_prefix, vision_prefix = ([], []) if share else (None, None)
        x = resume[TEXT] if resume else self.text.embeddings(input_ids)
        t = start_tokens(x, mode, valid=attention_mask.bool(), protect=text_protect(attention_mask), layout=layout)
        t = self.text.stack(t, mode=mode, tau=tau, meter=meter, records=records.setdefault(TEXT, []),
                            outputs=text_outs, prefix=text_prefix, resume=bool(resume))
        x = resume[VISION] if resume else self.vision.ln_pre(self.vision.embed(pixels))
        v = self.vision.stack(start_tokens(x, mode, protect=vision_protect(x), layout=layout), mode=mode, other=t.mean(),
                              tau=tau, meter=meter, records=records.setdefault(VISION, []), track_alive=track_alive,
                              outputs=image_outs, prefix=vision_prefix, resume=bool(resume))
        if share:
            prefix.update({TEXT: text_prefix[0], VISION: vision_prefix[0]})
        if bridged:
            t0, v0 = text_outs[cfg.bridge_layers[0]], image_outs[cfg.bridge_layers[0]]
            t = t0.project(lambda _: self.text_input_norm(self._bridge(t0, t0, None)))
            v = v0.project(lambda _: self.image_input_norm(self._bridge(v0, v0, image_index)))
        else:
            t = t.project(lambda x: self.text_transform(x) + self._type_embedding(x, None))
            v = v.project(lambda x: self.image_transform(self.vision.ln_post(x)) + self._type_embedding(x, image_index))
        t, v = self._cross(t, v, mode=mode, tau=tau, meter=meter, records=records, track_alive=track_alive,
                           text_outs=text_outs, image_outs=image_outs, full_text=attention_mask.sum(1),
                           image_index=image_index)
        return self.pooled(t.first(), v.first())

    def pooled(self, text_cls: Tensor, image_cls: Tensor) -> Tensor:
        """[CLS] of each stream through its pooler, concatenated (text first, as METER)."""
        return torch.cat([self.text_pooler(text_cls), self.image_pooler(image_cls)], -1)

    def _cross(self, t: TokenSet, v: TokenSet, *, mode: str, tau: float, meter: CostMeter,
               records: dict[str, list[LayerRecord]], track_alive: bool, text_outs: list[TokenSet] | None,
               image_outs: list[TokenSet] | None, full_text: Tensor, image_index: int) -> tuple[TokenSet, TokenSet]:
        cfg = self.config
        b = t.batch_size
        # The untrimmed reference: every valid text token and every image token, not what the
        # towers' trimmers left (that would hide the towers' savings from the cross layers).
        full_t = full_text.to(t.x.dtype)
        full_v = float(cfg.vision.num_tokens)
        rec_t, rec_v = records.setdefault(CROSS_TEXT, []), records.setdefault(CROSS_IMAGE, [])
        for j, (text_layer, image_layer) in enumerate(zip(self.text_layers, self.image_layers)):
            if j > 0 and cfg.bridge_layers:
                uni = cfg.bridge_layers[j]
                t = t.with_x(self.text_links[j - 1](self._bridge(text_outs[uni], t, None) + t.x))
                v = v.with_x(self.image_links[j - 1](self._bridge(image_outs[uni], v, image_index) + v.x))
            # Both streams decide from the previous layer's outputs, each seeing the other's summary.
            t_pool, v_pool = t.mean(), v.mean()
            ts = trim_tokens(self._trimmer("text_tokens", j), t, mode, tau=tau, own=t_pool, other=v_pool,
                             block=text_layer)
            vs = trim_tokens(self._trimmer("image_tokens", j), v, mode, tau=tau, own=v_pool, other=t_pool,
                             block=image_layer)
            t, v = ts.tokens, vs.tokens
            t_pool, v_pool = t.mean(), v.mean()
            h = cfg.cross_heads
            packed = t.packing is not None
            slice_t = packed and text_layer.self_attn.slices_heads_per_sample(t.packing)
            slice_v = packed and image_layer.self_attn.slices_heads_per_sample(v.packing)
            th = trim_heads(self._trimmer("text_self_heads", j), h, t_pool, mode, tau=tau, other=v_pool, packed=packed,
                            per_sample=slice_t)
            tc = trim_heads(self._trimmer("text_cross_heads", j), h, t_pool, mode, tau=tau, other=v_pool, packed=packed,
                            per_sample=slice_t)
            ih = trim_heads(self._trimmer("image_self_heads", j), h, v_pool, mode, tau=tau, other=t_pool, packed=packed,
                            per_sample=slice_v)
            ic = trim_heads(self._trimmer("image_cross_heads", j), h, v_pool, mode, tau=tau, other=t_pool, packed=packed,
                            per_sample=slice_v)
            new_t = text_layer(t.x, v.x, keep=t.block_keep, context_keep=v.block_keep, head_mask=th.mask, heads=th.heads,
                               cross_head_mask=tc.mask, cross_heads=tc.heads, packing=t.packing,
                               context_packing=v.packing, head_keep=th.keep, cross_head_keep=tc.keep)
            new_v = image_layer(v.x, t.x, keep=v.block_keep, context_keep=t.block_keep, head_mask=ih.mask, heads=ih.heads,
                                cross_head_mask=ic.mask, cross_heads=ic.heads, packing=v.packing,
                                context_packing=t.packing, head_keep=ih.keep, cross_head_keep=ic.keep)
            n_t, n_v = token_cost(t, ts), token_cost(v, vs)
            pairs_t = (core_pairs(text_layer.self_attn, t.packing, head_keep=th.keep),
                       core_pairs(text_layer.cross_attn, t.packing, v.packing, tc.keep))
            pairs_v = (core_pairs(image_layer.self_attn, v.packing, head_keep=ih.keep),
                       core_pairs(image_layer.cross_attn, v.packing, t.packing, ic.keep))
            over_t, over_v = ts.overhead + th.overhead + tc.overhead, vs.overhead + ih.overhead + ic.overhead
            own_t = own_v = None  # what each sample kept, where the batch ran more (padding, head unions)
            if mode == "eval":
                kept_t, kept_v = t.kept_counts(), v.kept_counts()
                own_t = block_flops(text_layer, kept_t, th.kept, context_n=kept_v, cross_heads=tc.kept) + over_t
                own_v = block_flops(image_layer, kept_v, ih.kept, context_n=kept_t, cross_heads=ic.kept) + over_v
            meter.add(block_flops(text_layer, n_t, th.cost_heads, context_n=n_v, cross_heads=tc.cost_heads,
                                  pairs=pairs_t[0], cross_pairs=pairs_t[1]) + over_t,
                      block_flops(text_layer, full_t, context_n=full_v), b, t.x.device, own=own_t)
            meter.add(block_flops(image_layer, n_v, ih.cost_heads, context_n=n_t, cross_heads=ic.cost_heads,
                                  pairs=pairs_v[0], cross_pairs=pairs_v[1]) + over_v,
                      block_flops(image_layer, full_v, context_n=full_t), b, t.x.device, own=own_v)
            rec_t.append(LayerRecord(t.kept_counts().detach(), (th.kept + tc.kept).detach() / 2))
            rec_v.append(LayerRecord(v.kept_counts().detach(), (ih.kept + ic.kept).detach() / 2,
                                     v.alive_positions() if track_alive else None))
            t, v = t.with_x(new_t), v.with_x(new_v)
        return t, v
