"""big.LITTLE routing (bLViT, arXiv 2410.10267) for windowed encoders: every token is updated,
only the important ones at full width.

For one block with input tokens x (one attention group: a window, or an image for a global
block), with the full block's attention A, MLP M and norms N1, N2 (the P-block) and a narrow
E-block E (`trim.nn.LittleBlock`)::

    h     = N1(x)                                  (window padding: h = 0, as SAM pads)
    s_i   = 2 sigmoid(w . h_i + b)                 predictor; 1 at its zero start ("neutral")
    T     = the k highest s_i of the group, k = ceil(keep * alive tokens)
            (grid tokens before padding; keep = 0.25 by default)
    a_t   = A(h_t | keys and values h_j of every alive token j)   t in T: semi-cross attention
    p_t   = a_t + M(N2(x_t + a_t))                  the P-block's residual update of t
    e_i   = E(x)_i - x_i                             the E-block's residual update, every token
    y_i   = x_i + gamma * e_i + [i in T] s_i p_i     gamma: learnable per channel, starts tiny

At its start (gamma ~ 1e-4, s = 1) a routed block gives its selected tokens exactly the full
block's output (semi-cross attention sees every key) and leaves the others nearly unchanged;
training grows gamma and teaches the predictor, whose only gradient is through s_i p_i (top-k
itself is not differentiable, as in Mixture-of-Depths). Routing is the same computation in every
trimming mode: the P-block always runs on the gathered top-k (a rectangular tensor), so there is
no masked variant to keep equal to it.

The E-block is built from the P-block's weights (`little_from_big`): its heads are the P-block's
heads with the largest output norm (q/k/v rows, output-projection columns and the shared
relative-position tables copied), its norms are copies, and its MLP (linear map down to the
narrow width, MLP, linear map back) starts as the best rank-``inner`` approximation (truncated
SVD) of the P-block's MLP restricted to its highest-norm hidden channels. So a fresh E-block
already computes a cheap version of what the P-block computes.

`feature_distillation` (in `trim.prune.distill`) is the cosine loss toward the full encoder that
bLViT trains with (weight 2.5).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trim.nn import AttentionGroups, LittleBlock, WindowBlock, gate
from trim.nn.attention import head_rows
from trim.nn.tokens import gather_tokens


def little_width(block: WindowBlock, ratio: float) -> tuple[int, int]:
    """(heads, inner width) of the E-block for ``block`` at ``ratio`` of its width."""
    heads = max(1, round(block.attn.num_heads * ratio))
    return heads, heads * block.attn.head_dim


class BigLittleRouter(nn.Module):
    """Predictor, E-block and fusion gamma of one routed block (the P-block is the encoder's own block)."""

    def __init__(self, big: WindowBlock, *, keep: float = 0.25, width: float = 0.25, gamma_init: float = 1e-4) -> None:
        super().__init__()
        dim = big.attn.dim
        heads, inner = little_width(big, width)
        rel = big.attn.rel_pos
        self.little = LittleBlock(dim, heads, big.attn.head_dim, inner, big.mlp.fc1.out_features / dim,
                                  rel_pos_size=None if rel is None else rel.size, eps=big.norm1.eps,
                                  qkv_bias=big.attn.qkv.bias is not None)
        self.little.mlp.act = copy.deepcopy(big.mlp.act)
        self.predictor = nn.Linear(dim, 1)
        nn.init.zeros_(self.predictor.weight)  # neutral scores: s = 2 sigmoid(0) = 1
        nn.init.zeros_(self.predictor.bias)
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))
        self.keep = keep
        self.forced_ratio: float | None = None  # benchmarks: route this share instead of ``keep``
        little_from_big(self.little, big)

    @property
    def share(self) -> float:
        """Share of each group's alive tokens the P-block runs on."""
        return self.keep if self.forced_ratio is None else float(self.forced_ratio)

    def forward(self, big: WindowBlock, groups: AttentionGroups) -> Tensor:
        """The routed block's output on ``groups`` (G, N, C); dead tokens pass through unchanged."""
        x, keys, padding = groups.x, groups.keys, groups.padding
        positions = groups.positions if big.attn.rel_pos is not None else None
        h = big.norm1(x)
        if padding is not None:
            h = h.masked_fill(padding[..., None], 0.0)
        score = 2 * torch.sigmoid(self.predictor(h).squeeze(-1))
        alive = torch.ones_like(score, dtype=torch.bool) if keys is None else keys > 0
        real = alive if padding is None else alive & ~padding
        count = torch.ceil(self.share * alive.sum(1)).long().clamp(min=1)  # (G,) per group's alive tokens
        k = min(int(count.max()), x.shape[1])
        # Grid tokens by score, then padding, then dead tokens (s < 2 keeps the levels apart); ties in
        # token order, so a masked and a physical layout select alike.
        key = (alive.double() + real.double()) * 4 + score.detach().double()
        index = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
        chosen = (torch.arange(k, device=x.device) < count[:, None]).to(x.dtype)  # rows with fewer alive tokens
        a = big.attn(h, key_keep=keys, positions=positions, query_index=index)
        xs = gather_tokens(x, index)
        p = a + big.mlp(big.norm2(xs + a))
        y = x + self.gamma * self.little.update(x, positions=groups.positions, keys=keys, padding=padding)
        boost = (score.gather(1, index) * chosen)[..., None] * p
        y = y.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), gather_tokens(y, index) + boost)
        return gate(y, x, groups.update)


@torch.no_grad()
def little_from_big(little: LittleBlock, big: WindowBlock) -> None:
    """Initialise the E-block ``little`` from the P-block ``big`` (see the module docstring)."""
    little.norm1.load_state_dict(big.norm1.state_dict())
    little.norm2.load_state_dict(big.norm2.state_dict())
    attn, small = big.attn, little.attn
    d, inner = attn.head_dim, attn.inner_dim
    w_v = attn.qkv.weight[2 * inner:].view(attn.num_heads, d, -1)
    w_o = attn.proj.weight.view(attn.proj.out_features, attn.num_heads, d)
    strength = w_v.norm(dim=(1, 2)) * w_o.norm(dim=(0, 2))
    heads = strength.topk(small.num_heads).indices.sort().values
    rows = head_rows(heads, d)
    qkv_rows = torch.cat([rows, rows + inner, rows + 2 * inner])
    small.qkv.weight.copy_(attn.qkv.weight[qkv_rows])
    if small.qkv.bias is not None:
        small.qkv.bias.copy_(attn.qkv.bias[qkv_rows])
    small.proj.weight.copy_(attn.proj.weight[:, rows])
    small.proj.bias.copy_(attn.proj.bias)
    if small.rel_pos is not None:
        small.rel_pos.load_state_dict(attn.rel_pos.state_dict())
    # MLP: the highest-norm hidden channels, then the best rank-`inner` factorisation through the narrow width.
    fc1, fc2 = big.mlp.fc1, big.mlp.fc2
    hidden = little.mlp.fc1.out_features
    rank = little.down.out_features
    channels = (fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)).topk(hidden).indices.sort().values
    u1, s1, v1 = torch.linalg.svd(fc1.weight[channels].float(), full_matrices=False)
    little.down.weight.copy_(v1[:rank])
    little.down.bias.zero_()
    little.mlp.fc1.weight.copy_(u1[:, :rank] * s1[:rank])
    little.mlp.fc1.bias.copy_(fc1.bias[channels])
    u2, s2, v2 = torch.linalg.svd(fc2.weight[:, channels].float(), full_matrices=False)
    little.mlp.fc2.weight.copy_(s2[:rank, None] * v2[:rank])
    little.mlp.fc2.bias.zero_()
    little.up.weight.copy_(u2[:, :rank])
    little.up.bias.copy_(fc2.bias)
