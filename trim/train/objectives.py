"""Training objectives: what one micro-batch's loss is, method by method.

SmartTrim (``method: smarttrim``)::

    loss = task_weight  * task(student logits, labels)
         + lambda_cost  * (mean_batch(expected cost ratio) - target(step))^2
         + distill.weight * D(student logits, teacher logits; temperature)
         + hidden_cosine  * (1 - cos(student pooled, teacher pooled))
         + binarize       * mean over trimmer decisions of 4 p (1 - p)      (optional, default 0)

* the student runs with ``trim="train"``: Gumbel-sigmoid decisions at temperature
  ``tau(step)`` (annealed ``tau_start -> tau_end``) with straight-through gradients, and a
  differentiable expected cost ratio (trimmed / full FLOPs) per sample;
* the teacher is the same weights with ``trim="off"`` under ``no_grad`` (self-distillation),
  called as ``teacher(batch, prefix)``: ``prefix`` is the student's `ModelOutput.prefix`, the
  values of the blocks before the first trimmers, which both passes compute alike (trim has no
  dropout), so the teacher resumes from them instead of running them again;
  D is KL of softened distributions for single-label heads (NLVR2) and BCE toward the
  teacher's sigmoid for multi-label heads (VQA);
* ``target(step)`` follows the curriculum: 1.0 for ``curriculum.warmup`` steps, then down
  to ``objective.target`` over ``curriculum.steps`` steps;
* the cost term penalises the *batch mean*, so inputs may differ (easy ones trim more) as
  long as the batch meets the budget. Under data parallelism the mean is taken over the
  global batch (a differentiable all-reduce), so N processes train exactly what one
  process with the global batch would.

* ``binarize`` (not in the paper; off by default) closes a gap between training and
  inference: the cost term sees the *expected* cost, where keep probabilities multiply down
  the layers, while inference keeps a token exactly when p > 1/2. Probabilities that all sit a
  little above 1/2 meet the budget in expectation and keep everything at inference; the
  penalty pushes each p to 0 or 1, where both agree.

Plain fine-tuning (``method: none``): ``task_weight * task`` with trimming off; the
trimmers (if any) are frozen.

Task losses follow ViLT / METER: VQA = BCE-with-logits on the soft scores, mean over
answers times the number of answers; NLVR2 / ITM = cross-entropy.

Baselines (``method: text_agnostic | static_heads | fixed_ratio | random | evit``): the same loss
and schedules as SmartTrim, on the model's baseline trimmers (the method sets
``model.trim.policy``; `trim.prune.policies` describes each). ``fixed_ratio``, ``random`` and
``evit`` keep a fixed ratio r of tokens instead of deciding a count per input: before each
step r is set so that the model's cost equals ``target(step)`` (`trim.prune.keep_ratio`,
tabulated on the first batch); their cost term is then ~0 and carries no gradient. They are
not calibrated after training (``calibrates = False``): r already meets the target.

Prompted segmentation (``method: seg``, the sam family): SAM's loss over box, click and
refinement-click prompts, plus the cost and distillation terms when the encoder trims; see
`PromptedSegmentation`.

Later methods register themselves in ``METHODS`` with ``@register("name")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trim.prune.curriculum import Curriculum
from trim.prune.distill import bce_sigmoid, hidden_cosine, kl_logits
from trim.prune.gumbel import TemperatureSchedule
from trim.prune.keep_ratio import KeepRatioSchedule, fit_keep_ratio, set_keep_ratio

METHODS: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def task_loss(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """ViLT / METER task losses (mean over the batch)."""
    if task == "vqa":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[-1]
    return F.cross_entropy(logits.float(), labels.long())


def distill_kind(kind: str, task: str) -> str:
    if kind != "auto":
        return kind
    return "bce" if task == "vqa" else "kl"


@dataclass
class StepResult:
    """The loss to backpropagate and the detached numbers to log."""

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)
    output: Any = None


def identity_mean(x: Tensor) -> Tensor:
    return x


def kept_counts(records: dict[str, list]) -> dict[str, float]:
    """Mean kept tokens / heads per stream over layers and samples (NLVR2's two images merged)."""
    from trim.models.streams import split_record_name  # imported here: this function is all that needs it

    tokens: dict[str, list[Tensor]] = {}
    heads: dict[str, list[Tensor]] = {}
    for name, layers in records.items():
        base, _ = split_record_name(name)
        for rec in layers:
            tokens.setdefault(base, []).append(rec.tokens.float().mean())
            heads.setdefault(base, []).append(rec.heads.float().mean())
    out = {}
    for base, values in tokens.items():
        out[f"kept_tokens/{base}"] = float(torch.stack(values).mean())
        out[f"kept_heads/{base}"] = float(torch.stack(heads[base]).mean())
    return out


@contextlib.contextmanager
def keep_probabilities(model: torch.nn.Module) -> Iterator[list[Tensor]]:
    """Collect every trimmer's keep probabilities of the forward passes run inside the block.

    Token trimmers contribute their prunable alive tokens only (padding, special and already
    dropped tokens have no decision to make); head trimmers every head.
    """
    from trim.prune import HeadTrimmer, TokenTrimmer
    from trim.prune.static_heads import StaticHeadGate

    found: list[Tensor] = []

    def token_hook(module, args, output):
        tokens, prob = args[0], output[1]
        found.append(prob[tokens.keep.bool() & ~tokens.protect])

    def head_hook(module, args, output):
        found.append(output[1].flatten())

    handles = []
    for m in model.modules():
        if isinstance(m, TokenTrimmer):
            handles.append(m.register_forward_hook(token_hook))
        elif isinstance(m, (HeadTrimmer, StaticHeadGate)):
            handles.append(m.register_forward_hook(head_hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def indecision(probs: list[Tensor]) -> Tensor:
    """Mean of 4 p (1 - p) over all decisions: 1 when every keep probability is 1/2, 0 when all are 0 or 1."""
    flat = torch.cat([p.float().flatten() for p in probs])
    return (4 * flat * (1 - flat)).mean() if flat.numel() else flat.sum()


class Objective:
    """Base: plain task loss with trimming off. Subclasses add terms and schedules."""

    name = "base"
    trains_trimmers = False
    needs_teacher = False
    calibrates = True  # whether the final checkpoint's logit-shift calibration applies (trim.prune.calibrate)

    def __init__(self, cfg: Any, *, task: str) -> None:
        self.cfg = cfg
        self.task = task

    # schedules -------------------------------------------------------------
    def target(self, step: int) -> float:
        return 1.0

    def tau(self, step: int) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def set_step(self, step: int) -> None:
        """Schedules read ``step`` = optimizer steps completed before the current one."""

    def sync_model(self, model: torch.nn.Module) -> None:
        """Bring model state that follows the schedules (a fixed keep ratio) to the current step's,
        so that evaluation and checkpoints see it; called after every optimizer step."""

    # the loss ---------------------------------------------------------------
    def __call__(self, model: Callable, batch: dict, step: int, *, teacher: Callable | None = None,
                 global_mean: Callable[[Tensor], Tensor] = identity_mean) -> StepResult:
        raise NotImplementedError

    def eval_trim(self) -> str:
        return "off"


@register("none")
class PlainFineTuning(Objective):
    def __call__(self, model, batch, step, *, teacher=None, global_mean=identity_mean) -> StepResult:
        out = model(batch, trim="off")
        task = task_loss(out.logits, batch["labels"], self.task)
        loss = self.cfg.task_weight * task
        return StepResult(loss, {"loss": float(loss.detach()), "loss/task": float(task.detach()),
                                 "cost_ratio": float(out.cost_ratio.detach().float().mean())}, out)


@register("smarttrim")
class SmartTrim(Objective):
    trains_trimmers = True

    def __init__(self, cfg: Any, *, task: str) -> None:
        super().__init__(cfg, task=task)
        c, g = cfg.curriculum, cfg.gumbel
        self.curriculum = Curriculum(final=cfg.target, steps=c.steps, warmup=c.warmup, shape=c.shape)
        self.temperature = TemperatureSchedule(start=g.tau_start, end=g.tau_end, steps=g.steps)
        self.distill = {"kl": kl_logits, "bce": bce_sigmoid}[distill_kind(cfg.distill.kind, task)]
        self.needs_teacher = cfg.distill.weight > 0 or cfg.hidden_cosine > 0

    def target(self, step: int) -> float:
        return self.curriculum.target(step)

    def tau(self, step: int) -> float:
        return self.temperature(step)

    def set_step(self, step: int) -> None:
        self.curriculum.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "curriculum" in state:
            self.curriculum.load_state_dict(state["curriculum"])

    def eval_trim(self) -> str:
        return self.cfg.eval_trim

    def __call__(self, model, batch, step, *, teacher=None, global_mean=identity_mean) -> StepResult:
        cfg = self.cfg
        target, tau = self.target(step), self.tau(step)
        with keep_probabilities(model) if cfg.binarize > 0 else contextlib.nullcontext([]) as probs:
            out = model(batch, trim="train", tau=tau)
        task = task_loss(out.logits, batch["labels"], self.task)
        ratio = global_mean(out.cost_ratio.float().mean())
        cost = (ratio - target) ** 2
        loss = cfg.task_weight * task + cfg.lambda_cost * cost
        terms = {"loss/task": float(task.detach()), "loss/cost": float(cost.detach()),
                 "cost_ratio": float(ratio.detach()), "target": target, "tau": tau}
        if cfg.binarize > 0 and probs:
            b = indecision(probs)
            loss = loss + cfg.binarize * b
            terms["loss/binarize"] = float(b.detach())
        if self.needs_teacher:
            if teacher is None:
                raise RuntimeError("SmartTrim distillation needs the teacher pass (trim='off'); pass teacher=")
            with torch.no_grad():
                ref = teacher(batch, out.prefix)
            if cfg.distill.weight > 0:
                d = self.distill(out.logits.float(), ref.logits.float(), cfg.distill.temperature)
                loss = loss + cfg.distill.weight * d
                terms["loss/distill"] = float(d.detach())
            if cfg.hidden_cosine > 0:
                h = hidden_cosine(out.hidden.float(), ref.hidden.float())
                loss = loss + cfg.hidden_cosine * h
                terms["loss/hidden"] = float(h.detach())
        terms["loss"] = float(loss.detach())
        terms.update(kept_counts(out.records))
        return StepResult(loss, terms, out)


@register("text_agnostic")
class TextAgnostic(SmartTrim):
    """SmartTrim's losses on trimmers that see their own modality only (DynamicViT-style)."""


@register("static_heads")
class StaticHeads(SmartTrim):
    """SmartTrim's losses with one learned head set shared by every input."""


class KeepRatioObjective(SmartTrim):
    """SmartTrim's losses on trimmers that keep a fixed ratio r, set from ``target(step)`` each step."""

    calibrates = False

    def __init__(self, cfg: Any, *, task: str) -> None:
        super().__init__(cfg, task=task)
        self.schedule: KeepRatioSchedule | None = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.schedule is not None:
            state["keep_ratio"] = self.schedule.to_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "keep_ratio" in state:
            self.schedule = KeepRatioSchedule.from_dict(state["keep_ratio"])

    def sync_model(self, model: torch.nn.Module) -> None:
        if self.schedule is not None:
            set_keep_ratio(model, self.schedule.ratio(self.target(self.curriculum.step)))

    def __call__(self, model, batch, step, *, teacher=None, global_mean=identity_mean) -> StepResult:
        if self.schedule is None:  # the table depends on shapes only: one batch fits it for the whole run
            self.schedule = fit_keep_ratio(model, batch, self.cfg.target, mean=global_mean)
        ratio = self.schedule.ratio(self.target(step))
        set_keep_ratio(model, ratio)
        result = super().__call__(model, batch, step, teacher=teacher, global_mean=global_mean)
        result.terms["keep_ratio"] = ratio
        return result


@register("fixed_ratio")
class FixedRatio(KeepRatioObjective):
    """SmartTrim's trimmers keeping their top k(n, r) tokens and heads per input."""


@register("random")
class RandomKeep(KeepRatioObjective):
    """A random k(n, r) tokens per input, every head."""


@register("evit")
class Evit(KeepRatioObjective):
    """EViT: the top k(n, r) tokens by [CLS] attention, the rest fused into one."""

@register("seg")
class PromptedSegmentation(SmartTrim):
    """SAM's training loss for the sam family (task ``seg``); see `trim.train.seg_loss` / `seg_prompts`::

        loss = task_weight * mean over prompt rounds of (focal * focal + dice * dice + iou * IoU-MSE)
             + lambda_cost * (mean_batch(cost ratio) - target(step))^2            [model carries cost_ratio]
             + distill.weight * (1 - cos(student, teacher image embeddings))     [model carries cost_ratio]

    Prompt rounds per step, all on one image embedding (the encoder runs once): a jittered box
    (single mask), one random click (three masks, the lowest-loss one backpropagated, as SAM does
    for ambiguous prompts), then ``seg.click_rounds`` refinements, each adding a click from the
    previous round's error (``seg.refine_clicks``: uniform as SAM, or deepest as the evaluation;
    single mask). Objects are the batch's ``object_*`` tensors
    (``data.seg_objects`` per image); padding objects are left out of every mean.

    Trimming is the encoder's (``model.sam.trim``): when it has token trimmers or big.LITTLE routers
    the student runs ``trim="train"`` at the Gumbel temperature ``tau(step)`` and the cost and
    distillation terms join (the teacher, the same encoder with ``trim="off"`` under no_grad, runs
    only then); with prompt-aware trimming every prompt round is its own encoder pass. Without
    trimmers this trains the full model.
    """

    def __init__(self, cfg: Any, *, task: str) -> None:
        from trim.errors import ConfigError

        if task != "seg":
            raise ConfigError(f"objective.method=seg trains prompted segmentation; model.task={task!r} needs "
                              "objective.method smarttrim or none")
        super().__init__(cfg, task=task)
        self.needs_teacher = False  # the trainer's teacher takes VL batches; this objective runs its own

    def eval_trim(self) -> str:
        return "eval"

    def __call__(self, model, batch, step, *, teacher=None, global_mean=identity_mean) -> StepResult:
        from trim.models.sam_prompts import encoder_trims, prompt_round
        from trim.prune.distill import feature_distillation
        from trim.train.seg_loss import PromptRounds, downsample_targets
        from trim.train.seg_prompts import REFINE_CLICKS, first_clicks, jitter_boxes

        cfg, seg = self.cfg, self.cfg.seg
        sam = getattr(model, "module", model)  # DDP / DeepSpeed wrappers: predict() lives on the model
        images, masks, valid = batch["pixel_values"], batch["object_masks"], batch["object_valid"]
        boxes = jitter_boxes(batch["object_boxes"], images.shape[-1], noise=seg.box_noise, max_noise=seg.box_max_noise)
        trim, tau = ("train", self.tau(step)) if encoder_trims(sam) else ("off", 1.0)
        out = model(images, boxes=boxes, trim=trim, tau=tau)  # through the wrapper: DDP syncs the encoder
        rounds = PromptRounds(downsample_targets(masks, tuple(out.masks.shape[-2:])), valid, focal_weight=seg.focal,
                              dice_weight=seg.dice, focal_alpha=seg.focal_alpha)  # fmt: skip
        rounds.add("box", out.masks, out.iou)
        # Encoder passes whose cost the budget covers: the box round's, and with prompt-aware
        # trimming every click round's too (each re-encodes the image for its prompts). Leaving
        # them out lets click-conditioned decisions keep everything: trim eval then measured 0.91
        # for a model trained to 0.5 on its box passes alone.
        per_prompt = trim == "train" and getattr(sam.image_encoder, "prompt_aware", False)
        passes = [out]
        points = first_clicks(masks)
        labels = torch.ones(points.shape[:-1], dtype=torch.long, device=points.device)
        click = prompt_round(sam, images, out.image_embeddings, trim=trim, tau=tau, points=points, point_labels=labels,
                             multimask_output=True)  # fmt: skip
        chosen = rounds.add("click", click.masks, click.iou)
        passes += [click] if per_prompt else []
        for r in range(seg.click_rounds):
            pred = F.interpolate(chosen.detach().float(), size=masks.shape[-2:], mode="bilinear") > 0
            more, more_labels = REFINE_CLICKS[seg.refine_clicks](pred, masks)
            points, labels = torch.cat([points, more], -2), torch.cat([labels, more_labels], -1)
            refined = prompt_round(sam, images, out.image_embeddings, trim=trim, tau=tau, points=points,
                                   point_labels=labels)  # fmt: skip
            chosen = rounds.add(f"click{r + 2}", refined.masks, refined.iou)
            passes += [refined] if per_prompt else []

        mask_term, iou_term = rounds.mask_term(), rounds.iou_term()
        loss = cfg.task_weight * (mask_term + seg.iou * iou_term)
        terms = {"loss/mask": float(mask_term.detach()), "loss/iou_mse": float(iou_term.detach()), **rounds.logged}
        if trim == "train":
            target = self.target(step)
            ratio = global_mean(torch.stack([p.cost_ratio.float().mean() for p in passes]).mean())
            cost = (ratio - target) ** 2
            loss = loss + cfg.lambda_cost * cost
            terms.update({"loss/cost": float(cost.detach()), "cost_ratio": float(ratio.detach()), "target": target,
                          "tau": self.tau(step)})
            if cfg.distill.weight > 0:
                with torch.no_grad():
                    teacher_embeddings = sam.image_embeddings(images)
                # prompt-aware trimming encodes each of an image's prompts: (B * P, ...), image-major
                teacher_embeddings = teacher_embeddings.repeat_interleave(len(out.image_embeddings) // len(images), 0)
                d = feature_distillation(out.image_embeddings.float(), teacher_embeddings.float(),
                                         weight=1.0)  # fmt: skip
                loss = loss + cfg.distill.weight * d
                terms["loss/distill"] = float(d.detach())
        terms["loss"] = float(loss.detach())
        return StepResult(loss, terms, out)


def build_objective(cfg: Any, task: str) -> Objective:
    """The objective ``objective.method`` names: the registry is the one place a method is known."""
    from trim.errors import ConfigError

    if cfg.method not in METHODS:
        raise ConfigError(f"objective.method={cfg.method!r} is unknown; choose one of {', '.join(METHODS)} "
                          "(or register a new one with @trim.train.register)")
    return METHODS[cfg.method](cfg, task=task)
