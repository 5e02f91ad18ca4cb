"""Which trimmers a model builds: SmartTrim's, or a baseline's at the same places.

``model.trim.policy`` (set from ``objective.method`` by the recipe, stored in the checkpoint's
config so `trim.load` rebuilds the same trimmers) names one of:

=============== ======================================== ==========================================
policy          token trimmer                            head trimmer
=============== ======================================== ==========================================
smarttrim       SmartTrim: token, own modality's mean,   SmartTrim: own and other modality's pooled
                other modality's pooled feature; keep    features; keep if p > 1/2
                if p > 1/2
text_agnostic   SmartTrim's without the cross-modal      SmartTrim's without the other modality
                term (DynamicViT-style: token + own
                modality's mean)
static_heads    SmartTrim's                              one learned gate per head, shared by every
                                                         input (`trim.prune.static_heads`)
fixed_ratio     SmartTrim's scores, top k(n, r) per      SmartTrim's scores, top k(H, r) per input
                input (`trim.prune.fixed_ratio`)
random          a random k(n, r) per input               none: every head kept
                (`trim.prune.random_keep`)
evit            top k(n, r) by [CLS] attention, the      none: every head kept
                rest fused into one token
                (`trim.prune.evit`)
=============== ======================================== ==========================================

The first three decide per input by thresholding learned logits and are calibrated after
training like SmartTrim (`trim.prune.calibrate`). The last three (`RATIO_POLICIES`) keep a
fixed ratio r set from the budget (`trim.prune.keep_ratio`); calibration does not apply.
"""

from __future__ import annotations

import zlib

from trim.prune.evit import EvitTrimmer
from trim.prune.fixed_ratio import FixedRatioHeadTrimmer, FixedRatioTokenTrimmer
from trim.prune.random_keep import RandomTokenTrimmer
from trim.prune.static_heads import StaticHeadGate
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, Trimmer

POLICIES = ("smarttrim", "text_agnostic", "static_heads", "fixed_ratio", "random", "evit")
RATIO_POLICIES = ("fixed_ratio", "random", "evit")  # keep a fixed ratio r; no calibration
TOKEN_ONLY_POLICIES = ("random", "evit")  # build no head trimmers
HEAD_POLICIES = ("static_heads",)  # differ from smarttrim only in their head trimmers


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"model.trim.policy={policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def token_trimmer(policy: str, dim: int, other_dim: int | None, *, hidden: int | None = None, min_keep: int = 1,
                  init_logit: float = 3.0, name: str = "") -> Trimmer:
    """The token trimmer ``policy`` places on a layer of width ``dim`` (``other_dim``: the other
    modality's pooled width, None where there is none). ``name`` (stream and layer) seeds the random
    baseline, so each layer draws its own scores."""
    check_policy(policy)
    if policy == "random":
        return RandomTokenTrimmer(min_keep=min_keep, seed=zlib.crc32(name.encode()))
    if policy == "evit":
        return EvitTrimmer(min_keep=min_keep)
    kind = FixedRatioTokenTrimmer if policy == "fixed_ratio" else TokenTrimmer
    return kind(dim, None if policy == "text_agnostic" else other_dim, hidden=hidden, min_keep=min_keep,
                init_logit=init_logit)


def head_trimmer(policy: str, dim: int, num_heads: int, other_dim: int | None, *, hidden: int | None = None,
                 min_keep: int = 1, init_logit: float = 3.0) -> Trimmer | None:
    """The head trimmer ``policy`` places on an attention layer, or None (every head kept)."""
    check_policy(policy)
    if policy in TOKEN_ONLY_POLICIES:
        return None
    if policy == "static_heads":
        return StaticHeadGate(num_heads, min_keep=min_keep, init_logit=init_logit)
    kind = FixedRatioHeadTrimmer if policy == "fixed_ratio" else HeadTrimmer
    return kind(dim, num_heads, None if policy == "text_agnostic" else other_dim, hidden=hidden, min_keep=min_keep,
                init_logit=init_logit)
