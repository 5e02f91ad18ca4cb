"""What every trim model returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trim.prune import LayerRecord


@dataclass
class ModelOutput:
    logits: Tensor  # (B, num_labels)
    cost_ratio: Tensor  # (B,) FLOPs vs the untrimmed model; expected (differentiable) with trim="train"
    hidden: Tensor  # (B, D) pooled features fed to the head (cosine distillation reads them)
    records: dict[str, list[LayerRecord]] = field(default_factory=dict)  # stream -> per-layer kept counts
    # trim="train" only: per encoded image, each stream's detached values after the blocks before its
    # first trimmer, which every trimming mode computes alike; a trim="off" pass on the same batch
    # (the distillation teacher) resumes from them: ``model(batch, trim="off", resume=out.prefix)``.
    prefix: list[dict[str, Tensor]] | None = None
    # (B,) what each sample kept on its own (its tokens and heads, FLOPs vs the untrimmed model); it
    # equals ``cost_ratio`` except where a batch ran more: padding to its longest, its heads' union.
    sample_cost: Tensor | None = None

    def __post_init__(self) -> None:
        if self.sample_cost is None:
            self.sample_cost = self.cost_ratio
