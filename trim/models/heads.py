"""Task heads over pooled features, shaped as ViLT and METER shape them."""

from __future__ import annotations

from torch import Tensor, nn


class Classifier(nn.Sequential):
    """Linear -> LayerNorm -> GELU -> Linear (ViLT's and METER's VQA / NLVR2 classifiers)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_labels: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, num_labels))


class Pooler(nn.Module):
    """tanh(W x_cls + b): BERT's pooler, applied to each stream's first token ((B, D) in)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, cls: Tensor) -> Tensor:
        return self.dense(cls).tanh()


def make_head(task: str, pooled_dim: int, num_labels: int, hidden_dim: int, images: int = 2) -> nn.Module:
    """VQA: classifier over answers. NLVR2: the pair's pooled features concatenated.
    ITM: a linear match / no-match layer."""
    if task == "vqa":
        return Classifier(pooled_dim, hidden_dim, num_labels)
    if task == "nlvr2":
        return Classifier(pooled_dim * images, hidden_dim, num_labels)
    if task == "itm":
        return nn.Linear(pooled_dim, num_labels)
    raise ValueError(f"unknown task {task!r}")
