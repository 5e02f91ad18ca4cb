"""Behaviour shared by trim's VL models: the task forward around a per-image `encode`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.models.config import ModelConfig
from trim.models.output import ModelOutput
from trim.models.streams import per_image
from trim.prune import CostMeter, LayerRecord, auto_layout, trimmer_modules
from trim.prune.calibrate import Calibration, CalibrationError, logit_shift
from trim.prune.keep_ratio import CALIBRATION_SKIPPED, ratio_trimmers
from trim.prune.stack import check_mode


MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")  # the batch keys a model reads


class TrimModel(nn.Module):
    """A VL model whose ``forward(batch, trim=...)`` returns a `ModelOutput`.

    Subclasses implement ``encode(pixels, input_ids, attention_mask, ...) -> pooled``.
    NLVR2 batches carry two images per statement; as in ViLT and METER each image is
    encoded with the text and the two pooled features are concatenated.
    """

    config: ModelConfig
    head: nn.Module
    # Budget -> logit shift of a calibrated model (trim.prune.calibrate); load_model attaches it
    # from config.json. None: decisions are the trained logits' own (``logit > 0``).
    calibration: Calibration | None = None

    def encode(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, *, mode: str, tau: float,
               meter: CostMeter, records: dict[str, list[LayerRecord]], track_alive: bool,
               image_index: int = 0, layout: str = "packed", prefix: dict[str, Tensor] | None = None,
               resume: dict[str, Tensor] | None = None) -> Tensor:
        """``prefix``: a dict to fill with the values a pass in another mode may ``resume`` from
        (`ModelOutput.prefix`); a model that shares nothing leaves it empty."""
        raise NotImplementedError

    def forward(self, batch: dict, trim: str = "off", tau: float = 1.0, track_alive: bool = False,
                budget: float | None = None, layout: str = "auto",
                resume: list[dict[str, Tensor]] | None = None) -> ModelOutput:
        """``trim``: a trimming mode (`trim.prune.TRIM_MODES`).

        ``budget``: the mean cost ratio to serve with deterministic decisions (``masked`` /
        ``eval``), through the calibrated logit shift; None serves the calibrated target (or, for
        an uncalibrated model, the trained logits as they are).
        ``layout``: how ``trim="eval"`` holds the kept tokens, ``packed`` (each sample pays for
        what it kept) or ``padded`` (every sample padded to the batch's longest); ``auto`` picks by
        the vision stream's size (`trim.prune.auto_layout`), the same for every stream.
        ``resume``: the `ModelOutput.prefix` of a ``trim="train"`` pass on this same batch and weights;
        the blocks it covers are not run again (the distillation teacher's shared prefix).
        """
        check_mode(trim)
        if budget is not None and trim not in ("masked", "eval"):
            raise CalibrationError(f"budget={budget:g} with trim={trim!r}: a budget shifts deterministic "
                                   "decisions; use trim='eval' (or 'masked')")
        shift = self.budget_shift(budget) if trim in ("masked", "eval") else 0.0
        if shift:
            with logit_shift(self, shift):
                return self._forward(batch, trim, tau, track_alive, layout, resume)
        return self._forward(batch, trim, tau, track_alive, layout, resume)

    def budget_shift(self, budget: float | None) -> float:
        """The logit shift that serves ``budget`` (see ``forward``)."""
        if self.calibration is None:
            if budget is None:
                return 0.0
            if ratio_trimmers(self):
                raise CalibrationError(f"budget={budget:g}: {CALIBRATION_SKIPPED}; evaluate without a budget, or "
                                       "train this method at that target")
            raise CalibrationError(f"budget={budget:g} needs a calibrated model, and this one has no calibration "
                                   "(config.json has no 'calibration' section); run `trim calibrate CHECKPOINT "
                                   "--data ROOT` (training calibrates its final checkpoint) or drop the budget")
        return self.calibration.shift_for(budget)

    def _forward(self, batch: dict, trim: str, tau: float, track_alive: bool, layout: str,
                 resume: list[dict[str, Tensor]] | None) -> ModelOutput:
        if layout == "auto":  # one decision for the model: co-attention needs both streams in one layout
            layout = auto_layout(self.config.vision.width, self.config.vision.num_tokens)
        pixels, ids = batch["pixel_values"], batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        records: dict[str, list[LayerRecord]] = {}
        images = [pixels[:, k] for k in range(pixels.shape[1])] if pixels.dim() == 5 else [pixels]  # NLVR2: 2 images
        if resume is not None and len(resume) != len(images):
            raise ValueError(f"resume= holds the prefix of {len(resume)} images, this batch has {len(images)} per sample")
        pooled, costs, prefixes = [], [], []
        for k, image in enumerate(images):
            meter = CostMeter()
            recs: dict[str, list[LayerRecord]] = {}
            prefix: dict[str, Tensor] = {}
            pooled.append(self.encode(image, ids, mask, mode=trim, tau=tau, meter=meter, records=recs,
                                      track_alive=track_alive, image_index=k, layout=layout,
                                      prefix=prefix if trim == "train" else None,
                                      resume=None if resume is None else resume[k]))
            ratio = meter.ratio()
            costs.append((ratio, meter.sample_ratio() if trim == "eval" else ratio))
            prefixes.append(prefix)
            records.update({per_image(name, k): r for name, r in recs.items()} if len(images) > 1 else recs)
        hidden = pooled[0] if len(images) == 1 else torch.cat(pooled, -1)
        ran, own = costs[0] if len(costs) == 1 else (torch.stack(c).mean(0) for c in zip(*costs))  # NLVR2: the mean
        return ModelOutput(self.head(hidden), ran, hidden, records, prefixes if all(prefixes) else None, own)

    def trimmer_parameters(self):
        """Parameters of every trimmer (the trainer gives them their own learning rate)."""
        for _, module in trimmer_modules(self):
            yield from module.parameters()

    def backbone_parameters(self):
        trimmer_ids = {id(p) for p in self.trimmer_parameters()}
        return (p for p in self.parameters() if id(p) not in trimmer_ids)
