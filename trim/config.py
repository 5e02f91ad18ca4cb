"""Recipes: readable YAML validated into dataclasses before any work starts.

A recipe has five sections (see docs/training.md for every key)::

    name: shapes_vqa_dual_tiny_smarttrim     # the run folder is <output_dir>/<name>
    output_dir: runs
    model:      ModelConfig fields (family, task, vision.*, text.*, trim.*, ...), and optionally
                init_from: <checkpoint dir or run folder>  (start from those weights; the fields
                given here override its config, e.g. to add trimmers) or
                pretrained: <source for trim.models.from_pretrained>
    data:       shard root or urls, task, image size, batch size, workers
    train:      steps, lr, trimmer_lr, schedule, grad_accum, clip, precision, deepspeed, saving
    objective:  method (smarttrim | a baseline: random, evit, text_agnostic, static_heads, fixed_ratio |
                none), cost loss, curriculum, distillation, Gumbel temperature

``load_recipe(path, overrides)`` reads the YAML, applies dotted ``key.sub=value`` overrides,
and checks every key, type and value. An unknown or mistyped key, a wrong type or an
impossible value raises `trim.errors.ConfigError` naming the full dotted key and what is
allowed, e.g. ``objective.target=1.3 is not a cost ratio; use a value in (0, 1]``.
Checking reads no data and builds no model (it reads the ``config.json`` of an
``init_from`` checkpoint, nothing else).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trim.errors import CheckpointError, ConfigError
from trim.models.config import ModelConfig
from trim.models.io import LATEST_NAME, is_model_dir, read_config, resolve_checkpoint
from trim.schema import build_dataclass, coerce, deep_merge, reject_unknown

TRAIN_TASKS = ("vqa", "nlvr2", "seg")
# Objectives that train the model as it is: they need no trimmer (seg trims only when the model has trimmers).
METHODS_WITHOUT_TRIMMERS = ("none", "seg")
MODEL_SOURCE_KEYS = ("init_from", "pretrained")


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the shards are and how they are batched.

    ``root`` is a shard directory (``manifest.json``, ``tokenizer.json``, ``<task>/...``);
    ``train``/``val`` default to its splits of ``task``. Explicit urls (brace patterns,
    several joined with ``::``) override them.
    """

    task: str = "vqa"
    root: str | None = None
    train: str | None = None
    val: str | None = None
    val_split: str = "val"
    tokenizer: str | None = None  # default: <root>/tokenizer.json
    answers: str | None = None  # VQA answer vocabulary; default: answers.json beside the shards
    image_size: int = 64
    batch_size: int = 8  # per process and micro-step; global batch = batch_size x grad_accum x processes
    eval_batch_size: int | None = None  # default: 2 x batch_size
    num_workers: int = 0
    shuffle_buffer: int = 1000
    max_text_len: int = 40
    epoch_samples: int | None = None  # default: the manifest's count of the train split
    resampled: bool = True
    # batch: every rank reads the same stream and takes its slice of each global batch (exactly
    #   the batches of one process with the global batch size; each rank decodes everything).
    # shards: each rank reads its own shards (scales; batches differ from a 1-process run).
    rank_split: Literal["batch", "shards"] = "batch"
    val_samples: int | None = None  # periodic evaluation reads at most this many val samples
    seg_objects: int = 4  # seg: objects (masks + prompts) per image and step, chosen at random; padded when fewer

    def validate(self) -> None:
        if self.task not in TRAIN_TASKS:
            raise ConfigError(f"data.task={self.task!r} cannot be trained by `trim train`; choose one of {TRAIN_TASKS}")
        if self.root is None and self.train is None:
            raise ConfigError("data.root and data.train are both unset; give data.root (a shard directory written by "
                              "`trim data synth --out DIR`) or data.train (shard urls)")
        _positive("data.image_size", self.image_size)
        _positive("data.batch_size", self.batch_size)
        if self.eval_batch_size is not None:
            _positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 (0 reads in the training process)")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 or 1: no shuffling)")
        _positive("data.max_text_len", self.max_text_len)
        if self.epoch_samples is not None:
            _positive("data.epoch_samples", self.epoch_samples)
        if self.val_samples is not None:
            _positive("data.val_samples", self.val_samples)
        _positive("data.seg_objects", self.seg_objects)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 1e-4
    trimmer_lr: float | None = None  # learning rate of the trimmers (default: lr)
    # learning-rate multipliers by parameter-name prefix, e.g. {head.: 50, text_layers.: 5} (METER)
    lr_mult: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup: float = 0.1  # warm-up steps; a value below 1 is a fraction of train.steps
    min_lr_ratio: float = 0.0  # the cosine decays to lr x min_lr_ratio
    grad_accum: int = 1
    clip: float | None = 1.0  # max gradient norm; null: no clipping
    precision: Literal["no", "bf16", "fp16"] = "no"
    deepspeed: str | None = None  # DeepSpeed JSON (launch/deepspeed/zero2.json); null: DDP
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: only at the end); the last step is always saved
    keep_last: int = 0  # keep only the newest N checkpoints (0: keep all)
    eval_every: int = 0  # evaluate on the val split every N steps (0: never during training)
    eval_at_end: bool = True  # evaluate after the last step (when there is a val split)
    log_every: int = 10
    resume: str | None = None  # null | latest | a checkpoint directory
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        _positive("train.steps", self.steps)
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.trimmer_lr is not None and self.trimmer_lr <= 0:
            raise ConfigError(f"train.trimmer_lr={self.trimmer_lr} must be > 0 (or null to use train.lr)")
        for prefix, mult in self.lr_mult.items():
            if mult <= 0:
                raise ConfigError(f"train.lr_mult.{prefix}={mult} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        if self.eps <= 0:
            raise ConfigError(f"train.eps={self.eps} must be > 0")
        if self.warmup < 0 or (self.warmup >= 1 and not float(self.warmup).is_integer()):
            raise ConfigError(f"train.warmup={self.warmup}: give a whole number of steps or a fraction in [0, 1)")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup={self.warmup} is longer than train.steps={self.steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _positive("train.grad_accum", self.grad_accum)
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"train.clip={self.clip} must be > 0, or null for no clipping")
        for key in ("save_every", "keep_last", "eval_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0 (0 turns it off)")
        _positive("train.log_every", self.log_every)
        if self.resume is not None and self.resume != "latest" and not self.resume:
            raise ConfigError("train.resume is empty; use null, 'latest' or a checkpoint directory")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)


@dataclass
class CurriculumConfig:
    """target(step): 1.0 for ``warmup`` steps, then down to ``objective.target`` over ``steps``."""

    steps: int | None = None  # default: half of train.steps
    warmup: int = 0
    shape: Literal["linear", "cosine", "cubic"] = "linear"


@dataclass
class DistillConfig:
    """Self-distillation toward the untrimmed pass of the same weights (no gradient)."""

    kind: Literal["auto", "kl", "bce"] = "auto"  # auto: bce for vqa (multi-label), kl for nlvr2
    weight: float = 1.0
    temperature: float = 1.0


@dataclass
class GumbelConfig:
    tau_start: float = 1.0
    tau_end: float = 0.1
    steps: int | None = None  # default: train.steps


@dataclass
class SegLossConfig:
    """SAM's loss and simulated prompts (``objective.method: seg``; trim.train.seg_loss / seg_prompts)."""

    focal: float = 20.0  # SAM: focal : dice = 20 : 1
    # focal loss weight of object pixels (background: 1 - alpha); null weighs both alike (fvcore's
    # default; SAM does not say). RetinaNet's 0.25 shrank the tiny recipe's masks: box mIoU 0.70 vs 0.71
    focal_alpha: float | None = None
    dice: float = 1.0
    iou: float = 1.0  # weight of the IoU head's MSE
    box_noise: float = 0.1  # box coordinate noise, std as a fraction of the box side (SAM: 10%)
    box_max_noise: float = 20.0  # ... at most this many pixels (SAM: 20 at 1024 px)
    click_rounds: int = 1  # refinement clicks after the first, each from the previous prediction's error
    # where a refinement click goes: uniform over the error region (SAM), or its deepest point (RITM,
    # the evaluation protocol; a CPU distance transform per object and round)
    refine_clicks: Literal["uniform", "deepest"] = "uniform"

    def validate(self) -> None:
        for key in ("focal", "dice", "iou", "box_noise", "box_max_noise", "click_rounds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.seg.{key}={getattr(self, key)} must be >= 0")
        if self.focal_alpha is not None and not 0 < self.focal_alpha < 1:
            raise ConfigError(f"objective.seg.focal_alpha={self.focal_alpha} must be in (0, 1), or null")
        if self.focal == 0 and self.dice == 0:
            raise ConfigError("objective.seg.focal and objective.seg.dice are both 0: the masks would learn nothing")


@dataclass
class ObjectiveConfig:
    """loss = task_weight * task + lambda_cost * (E[cost ratio] - target(step))^2
    + distill.weight * distill(student, teacher) + hidden_cosine * (1 - cos(h_s, h_t))."""

    method: str = "smarttrim"  # a name in trim.train.objectives' registry
    task_weight: float = 1.0
    lambda_cost: float = 10.0
    target: float = 0.5  # final cost ratio (FLOPs of the trimmed model / FLOPs of the full one)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    hidden_cosine: float = 0.0
    # weight of mean 4 p (1 - p) over the trimmers' keep probabilities: pushes decisions to 0 or 1
    # so that inference's deterministic rule (keep if p > 1/2) costs what training expected
    binarize: float = 0.0
    gumbel: GumbelConfig = field(default_factory=GumbelConfig)
    # held-out (val) inputs on which the final checkpoint's budget calibration is fitted (0: none),
    # so the mean per-sample eval cost lands on the target (trim.prune.calibrate)
    calibration_samples: int = 512
    # how periodic evaluation runs the trimmed model: masked = inference's decisions and outputs,
    # cost per sample as if run alone; eval = gathered layout, cost includes each batch's padding
    eval_trim: Literal["masked", "eval"] = "masked"
    seg: SegLossConfig = field(default_factory=SegLossConfig)

    def validate(self) -> None:
        self.seg.validate()
        # objective.method is checked by the objective registry (trim.train.objectives.build_objective).
        if not (0.0 < self.target <= 1.0):
            raise ConfigError(f"objective.target={self.target} is not a cost ratio; use a value in (0, 1] "
                              "(0.5 keeps about half of the FLOPs, 1.0 keeps everything)")
        if self.calibration_samples < 0:
            raise ConfigError(f"objective.calibration_samples={self.calibration_samples} must be >= 0 (0: no calibration)")
        for key in ("task_weight", "lambda_cost", "hidden_cosine", "binarize"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)} must be >= 0")
        if self.distill.weight < 0:
            raise ConfigError(f"objective.distill.weight={self.distill.weight} must be >= 0 (0 turns distillation off)")
        if self.distill.temperature <= 0:
            raise ConfigError(f"objective.distill.temperature={self.distill.temperature} must be > 0")
        c = self.curriculum
        if c.steps is not None and c.steps < 0:
            raise ConfigError(f"objective.curriculum.steps={c.steps} must be >= 0")
        if c.warmup < 0:
            raise ConfigError(f"objective.curriculum.warmup={c.warmup} must be >= 0")
        g = self.gumbel
        if g.tau_start <= 0 or g.tau_end <= 0:
            raise ConfigError(f"objective.gumbel.tau_start={g.tau_start} and tau_end={g.tau_end} must be > 0")
        if g.steps is not None and g.steps < 0:
            raise ConfigError(f"objective.gumbel.steps={g.steps} must be >= 0")


@dataclass
class ModelSection:
    """The model to train: its full config and where its starting weights come from."""

    config: ModelConfig
    init_from: str | None = None  # a checkpoint directory (resolved: the step directory)
    pretrained: str | None = None  # a trim.models.from_pretrained source

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.init_from is not None:
            out["init_from"] = self.init_from
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained
        out.update(dataclasses.asdict(self.config))
        return out


@dataclass
class Recipe:
    name: str
    model: ModelSection
    data: DataConfig
    train: TrainConfig
    objective: ObjectiveConfig
    output_dir: str = "runs"
    description: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "output_dir": self.output_dir,
            "model": self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "objective": dataclasses.asdict(self.objective),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


_TOP_KEYS = ("name", "description", "output_dir", "model", "data", "train", "objective")
_SECTIONS = {"data": DataConfig, "train": TrainConfig, "objective": ObjectiveConfig}


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, check and resolve a recipe (a YAML path or an already-parsed mapping)."""
    if isinstance(path, Mapping):
        raw, where = json.loads(json.dumps(path)), "recipe"  # deep copy of plain data
    else:
        raw, where = read_yaml(path), str(path)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, where=where)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: a second
    ``train:`` section would otherwise silently replace the first one's keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"{key_node.start_mark.name}: the key {key!r} is given twice, on lines "
                                  f"{first_line[key]} and {line}; merge the two into one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, name: str = "<recipe>") -> Any:
    """Safe YAML with duplicate keys rejected (see `_UniqueKeyLoader`)."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist; pass a YAML recipe such as recipes/shapes_vqa_dual_tiny_full.yaml")
    try:
        raw = parse_yaml(p.read_text(), str(p))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {p} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {p} must be a mapping with keys {', '.join(_TOP_KEYS)}; got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 3e-4). Values are YAML (lists, null, true, ...)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key.sub=value (e.g. train.lr=3e-4 or objective.target=0.33)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part; write it like train.lr or model.trim.min_keep_tokens")
    try:
        value = parse_yaml(text, f"override {key}") if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({err})") from err
    return parts, value


def apply_override(raw: dict[str, Any], item: str) -> None:
    parts, value = parse_override(item)
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """Check a parsed recipe and resolve its defaults (curriculum length, model source, ...)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping; got {type(raw).__name__}")
    reject_unknown(raw, _TOP_KEYS, "")
    for key in ("name", "model", "data", "train", "objective"):
        if key not in raw:
            raise ConfigError(f"{where}: the key '{key}' is missing; a recipe needs {', '.join(_TOP_KEYS[3:])} and a name")
    name = coerce(str, raw["name"], "name")
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"name={name!r} must be a non-empty folder name without '/'")
    sections = {key: build_dataclass(cls, raw[key], key) for key, cls in _SECTIONS.items()}
    data: DataConfig = sections["data"]
    train: TrainConfig = sections["train"]
    objective: ObjectiveConfig = sections["objective"]
    data.validate()
    train.validate()
    objective.validate()
    model = _model_section(raw["model"])
    _set_policy(model.config, objective.method, raw["model"])
    recipe = Recipe(name=name, model=model, data=data, train=train, objective=objective,
                    output_dir=coerce(str, raw.get("output_dir", "runs"), "output_dir"),
                    description=coerce(str, raw.get("description", "") or "", "description"))
    _resolve(recipe)
    return recipe


def _resolve(recipe: Recipe) -> None:
    """Cross-section checks, and defaults that depend on other sections."""
    cfg, data, train, obj = recipe.model.config, recipe.data, recipe.train, recipe.objective
    if cfg.task != data.task:
        raise ConfigError(f"data.task={data.task!r} but model.task={cfg.task!r}; they must name the same task")
    image_key, image_size = (("sam.encoder.image_size", cfg.sam.encoder.image_size) if cfg.family == "sam"
                             else ("vision.image_size", cfg.vision.image_size))
    if image_size != data.image_size:
        raise ConfigError(f"data.image_size={data.image_size} but model.{image_key}={image_size}; "
                          "set both to the same size")
    if obj.method == "seg" and cfg.task != "seg":
        raise ConfigError(f"objective.method=seg is SAM's segmentation loss; model.task={cfg.task!r} trains with "
                          "objective.method smarttrim or none")
    if cfg.task == "seg" and obj.method != "seg":
        raise ConfigError(f"model.task=seg with objective.method={obj.method!r}: segmentation trains with "
                          "objective.method=seg (SAM's loss; it trims when the model has trimmers)")
    if data.eval_batch_size is None:
        data.eval_batch_size = 2 * data.batch_size
    if obj.curriculum.steps is None:
        obj.curriculum.steps = max(1, train.steps // 2)
    if obj.gumbel.steps is None:
        obj.gumbel.steps = train.steps
    if obj.method != "none" and obj.curriculum.warmup + obj.curriculum.steps > train.steps:
        raise ConfigError(f"objective.curriculum.warmup + steps = {obj.curriculum.warmup + obj.curriculum.steps} "
                          f"is beyond train.steps={train.steps}; the final target would never be reached")
    if obj.method not in METHODS_WITHOUT_TRIMMERS and not _has_trimmers(cfg):
        raise ConfigError(f"objective.method={obj.method!r} trains trimmers but model.trim places none; add layers to "
                          "model.trim.vision_token_layers / cross_token_layers / ..., or use objective.method=none")
    if obj.distill.kind == "kl" and cfg.task == "vqa":
        raise ConfigError("objective.distill.kind=kl: VQA heads are multi-label (sigmoid); use bce or auto")
    if obj.distill.kind == "bce" and cfg.task != "vqa":
        raise ConfigError(f"objective.distill.kind=bce: {cfg.task} heads are single-label (softmax); use kl or auto")
    if train.deepspeed is not None and not Path(train.deepspeed).is_file():
        raise ConfigError(f"train.deepspeed={train.deepspeed!r} does not exist; use a JSON file such as "
                          "launch/deepspeed/zero2.json, or null for DDP")


def _set_policy(cfg: ModelConfig, method: str, raw_model: Any) -> None:
    """A trimming method's trimmers: ``objective.method`` names SmartTrim or a baseline, and the model
    config carries it as ``model.trim.policy`` (so the checkpoint rebuilds the same trimmers). A
    policy the recipe states itself must agree; one inherited from ``init_from`` is replaced."""
    from trim.prune.policies import POLICIES

    if method not in POLICIES:
        return
    trim_section = raw_model.get("trim") if isinstance(raw_model, Mapping) else None
    stated = trim_section.get("policy") if isinstance(trim_section, Mapping) else None
    if stated is not None and stated != method:
        raise ConfigError(f"model.trim.policy={stated!r} but objective.method={method!r}; objective.method sets the "
                          "policy: drop model.trim.policy from the recipe")
    cfg.trim.policy = method
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"objective.method={method!r}: {err}") from err


def _has_trimmers(cfg: Any) -> bool:
    trim = dataclasses.asdict(cfg.trim)
    return any(v for k, v in trim.items() if k.endswith("_layers"))


# ----------------------------------------------------------------------------- the model section


def _model_section(raw: Any) -> ModelSection:
    """The model's config: its source's config (a checkpoint's, or what a pretrained source
    converts to) with the recipe's fields laid over it, checked by `ModelConfig.validate`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model must be a mapping of ModelConfig fields (family, task, vision, ...); got {type(raw).__name__}")
    raw = dict(raw)
    init_from = coerce(str | None, raw.pop("init_from", None), "model.init_from")
    pretrained = coerce(str | None, raw.pop("pretrained", None), "model.pretrained")
    if init_from and pretrained:
        raise ConfigError("model.init_from and model.pretrained are both set; start from one of them")
    base: dict[str, Any] = {}
    try:  # a checkpoint the recipe names that cannot be read is a recipe error, found before any work
        if init_from:
            step_dir = resolve_checkpoint(init_from, "model.init_from")
            base = read_config(step_dir)["model"]
            init_from = str(step_dir.resolve())
        elif pretrained:
            base = _pretrained_config(pretrained, raw)
    except CheckpointError as err:
        key = "model.init_from" if init_from else "model.pretrained"
        message = str(err)
        raise ConfigError(message if message.startswith(key) else f"{key}={init_from or pretrained!r}: {message}") from err
    config = build_dataclass(ModelConfig, deep_merge(base, raw), "model")
    return ModelSection(config=config.validate(), init_from=init_from, pretrained=pretrained)


def _pretrained_config(source: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The config a pretrained source converts to, when it can be read without the weights."""
    path = Path(source)
    if is_model_dir(path) or (path / LATEST_NAME).is_file():  # a trim checkpoint or run folder
        return read_config(resolve_checkpoint(path, "model.pretrained"))["model"]
    try:
        from trim.models import convert
    except ImportError:
        return {}
    reader = getattr(convert, "pretrained_config", None)
    if reader is None:
        return {}
    try:
        cfg = reader(source, **overrides)
    except Exception as err:  # noqa: BLE001 - any failure to read the source is a recipe error
        raise ConfigError(f"model.pretrained={source!r} cannot be read ({err})") from err
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _positive(key: str, value: int | float) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")


__all__ = ["CurriculumConfig", "DataConfig", "DistillConfig", "GumbelConfig", "ModelSection", "ObjectiveConfig",
           "Recipe", "SegLossConfig", "TrainConfig", "apply_override", "load_recipe", "parse_override", "recipe_from_dict"]
