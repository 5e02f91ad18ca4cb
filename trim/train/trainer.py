"""The training loop: a thin layer over accelerate (DDP) or DeepSpeed, shaped like a torchtune recipe.

    check()  every check that needs no weights (recipe x data x objective x resume x output dir)
    setup()  Accelerator -> model (create / init_from / pretrained) -> AdamW (trimmers on their
             own learning rate) -> resume -> data stream
    train()  for each optimizer step: grad_accum x _loss_step -> _optimizer_step -> log /
             evaluate() / save_checkpoint()

Everything that decides what a run computes lives in the recipe; this file only orders
the work. Step numbers count optimizer steps; step ``s`` (1-based in the logs) uses the
curriculum target and Gumbel temperature of ``s - 1`` completed steps, so a run resumed
from ``step_<N>`` continues with exactly the target step ``N + 1`` would have had.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from trim.config import Recipe
from trim.errors import ConfigError
from trim.models.base import MODEL_INPUTS
from trim.models.io import load_model, resolve_checkpoint, transfer_weights, write_calibration
from trim.prune import trimmer_modules
from trim.prune.calibrate import calibrate, held_out_inputs
from trim.prune.keep_ratio import CALIBRATION_SKIPPED, model_keep_ratio
from trim.ranks import rank_and_world, rank_slice, slice_batch
from trim.train.checkpoint import STATE_NAME, CheckpointIO, fault_point, latest_checkpoint, list_checkpoints
from trim.train.data import DataSources, TrainStream, add_reads, batch_size_of, no_reads
from trim.train.distributed import (apply_launcher_env, check_devices, global_mean, load_deepspeed_config,
                                    make_accelerator)
from trim.train.objectives import Objective, build_objective, kept_counts
from trim.train.seg_eval import seg_eval_sums

log = logging.getLogger("trim.train")


# ----------------------------------------------------------------------------- small pieces


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _little_from_big(model: torch.nn.Module, added: list[str]) -> None:
    """big.LITTLE routers new to the starting weights: their E-blocks start from their P-blocks'
    weights (`trim.prune.little_from_big`), not at random."""
    if any(".routers." in key for key in added):
        model.image_encoder.init_little_from_big()


def eval_headline(record: dict[str, Any]) -> str:
    """The score of an eval record in words: accuracy (VQA, NLVR2) or box / 1-click mIoU (seg)."""
    if "box_miou" in record:
        return f"box mIoU {record['box_miou']:.4f}, 1-click mIoU {record['click_miou']:.4f} ({record['objects']} objects)"
    return f"accuracy {record['accuracy']:.4f}"


def param_groups(model: torch.nn.Module, *, lr: float, trimmer_lr: float, weight_decay: float,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: backbone / trimmers x decay / no decay (biases, norms: 1-d tensors) x lr multiplier.

    ``lr_mult`` maps parameter-name prefixes to multipliers of ``lr`` (the longest matching
    prefix wins; trimmers always use ``trimmer_lr``). A prefix that matches nothing is an error.
    """
    lr_mult = dict(lr_mult or {})
    used = dict.fromkeys(lr_mult, False)
    trimmer_ids = {id(p) for _, module in trimmer_modules(model) for p in module.parameters()}
    groups: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        prefix = max((k for k in lr_mult if name.startswith(k)), key=len, default=None)
        if prefix is not None:
            used[prefix] = True
        if not p.requires_grad:
            continue
        is_trimmer = id(p) in trimmer_ids
        mult = 1.0 if is_trimmer or prefix is None else lr_mult[prefix]
        groups.setdefault((is_trimmer, p.ndim >= 2, mult), []).append(p)
    unused = [k for k, hit in used.items() if not hit]
    if unused:
        top = sorted({n.split(".")[0] + "." for n, _ in model.named_parameters()})
        raise ConfigError(f"train.lr_mult: prefix {unused[0]!r} matches no parameter; top-level modules: {', '.join(top)}")
    out = []
    for (is_trimmer, decay, mult), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1], kv[0][2])):
        base = trimmer_lr if is_trimmer else lr * mult
        name = ("trimmer" if is_trimmer else "backbone") + ("" if decay else "_no_decay") + (f"_x{mult:g}" if mult != 1 else "")
        out.append({"params": params, "lr": base, "base_lr": base, "weight_decay": weight_decay if decay else 0.0,
                    "name": name})
    return out


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first differing dotted key of two nested dicts, as ``key: a vs b`` (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if d:
                return d
        return None
    if a != b:
        return f"{prefix}: {a!r} vs {b!r}"
    return None


class MetricsLog:
    """``metrics.jsonl`` + TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Records after the checkpoint belong to the killed continuation: the resumed run redoes them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            log.warning("tensorboard is not importable; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            group = "train" if record.get("kind") == "train" else record.get("split", "eval")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",):
                    self.tb.add_scalar(f"{group}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


# ----------------------------------------------------------------------------- checks before any work


def check_output_dir(run_dir: Path, output_dir: str) -> None:
    """The run folder can be created and written: found out before any work, not at the first save.

    ``os.access`` on the nearest existing folder; a regular file on the way fails for every
    user (root included), a folder without write permission for everyone but root.
    """
    existing = run_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir={output_dir!r}: {existing} is a file, so the run folder {run_dir} cannot be "
                          "created; choose another output_dir (or name)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "the run folder" if existing == run_dir else f"{existing}, where the run folder {run_dir} would go,"
        raise ConfigError(f"output_dir={output_dir!r}: {where} is not writable; choose another output_dir or make "
                          f"{existing} writable")


@dataclass
class Plan:
    """What `Trainer.check` resolved before any work: data, objective, where to resume, DeepSpeed config."""

    sources: DataSources
    objective: Objective
    deepspeed: dict[str, Any] | None
    resume_dir: Path | None = None
    resume_step: int = 0

    def finished(self, steps: int) -> bool:
        return self.resume_dir is not None and self.resume_step >= steps


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One run of a recipe. ``check`` -> ``setup`` -> ``train`` -> ``finish``; `run` does all four."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.run_dir = recipe.run_dir

    # -- before any process group exists --------------------------------------------------
    def check(self) -> Plan:
        """Every check that needs no weights; the same on every rank, and all `trim train --check` runs."""
        r = self.recipe
        check_output_dir(self.run_dir, r.output_dir)
        resume_dir = self.plan_resume()
        if resume_dir is not None:
            self.check_compatible(resume_dir)
        sources = DataSources(r.data)  # metadata only: shard lists, tokenizer, answers
        sources.check(r.model.config)
        objective = build_objective(r.objective, r.model.config.task)
        self.check_param_groups(objective)
        ds_config = None
        if r.train.deepspeed:
            ds_config = load_deepspeed_config(r.train.deepspeed, batch_size=r.data.batch_size,
                                              grad_accum=r.train.grad_accum, clip=r.train.clip,
                                              precision=r.train.precision, world=rank_and_world()[1])
        check_devices(precision=r.train.precision, deepspeed_config=ds_config)
        step = json.loads((resume_dir / STATE_NAME).read_text())["step"] if resume_dir is not None else 0
        return Plan(sources, objective, ds_config, resume_dir, int(step))

    def plan_resume(self) -> Path | None:
        """Which checkpoint to continue from (file-system checks only; same answer on all ranks)."""
        resume = self.recipe.train.resume
        if resume is None:
            done = list_checkpoints(self.run_dir)
            if done:
                raise ConfigError(f"train.resume is null but {self.run_dir} already holds checkpoints "
                                  f"({', '.join(p.name for p in done[-3:])}); continue it with train.resume=latest, "
                                  "or choose another name / output_dir")
            return None
        if resume == "latest":
            return latest_checkpoint(self.run_dir)
        step_dir = resolve_checkpoint(resume, "train.resume")
        if not (step_dir / STATE_NAME).is_file():
            raise ConfigError(f"train.resume={resume!r}: {step_dir} holds weights but no trainer state; start a new "
                              "run from it with model.init_from instead")
        return step_dir

    def check_compatible(self, step_dir: Path) -> None:
        saved = json.loads((step_dir / "config.json").read_text())
        diff = first_difference(saved.get("model"), self.recipe.model.config.to_dict()
                                if hasattr(self.recipe.model.config, "to_dict") else None)
        if diff:
            raise ConfigError(f"train.resume: {step_dir} was trained with a different model (model.{diff}); "
                              "resume with the same model section, or start a new run with model.init_from")
        method = saved.get("objective", {}).get("method")
        if method is not None and method != self.recipe.objective.method:
            raise ConfigError(f"train.resume: {step_dir} was trained with objective.method={method!r}, the recipe says "
                              f"{self.recipe.objective.method!r}; start a new run with model.init_from to switch")

    def check_param_groups(self, objective: Objective) -> None:
        """``train.lr_mult`` prefixes must name parameters: built on the meta device, so no memory and no weights."""
        from trim.models import create_model

        t = self.recipe.train
        if not t.lr_mult:
            return
        with torch.device("meta"):
            model = create_model(self.recipe.model.config)
        self._groups(model, objective)

    def _groups(self, model: torch.nn.Module, objective: Objective) -> list[dict]:
        if not objective.trains_trimmers:
            for _, module in trimmer_modules(model):
                module.requires_grad_(False)
        t = self.recipe.train
        return param_groups(model, lr=t.lr, trimmer_lr=t.trimmer_lr or t.lr, weight_decay=t.weight_decay,
                            lr_mult=t.lr_mult)

    # -- the model ------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from trim.models import create_model

        sec = self.recipe.model
        if sec.pretrained:
            return self._from_pretrained(sec.pretrained, sec.config)
        model = create_model(sec.config)
        if sec.init_from:
            # the source may have another head (another task: NLVR2 from a VQA model) or other trimmers
            added = transfer_weights(load_model(sec.init_from), model, source=f"model.init_from={sec.init_from!r}")
            _little_from_big(model, added)
            log.info("initialised from %s (%d fresh head / trimmer tensors)", sec.init_from, len(added))
        return model

    @staticmethod
    def _from_pretrained(source: str, cfg: Any) -> torch.nn.Module:
        """Convert ``source`` for the recipe's task and trimmers; its architecture must be the recipe's."""
        import dataclasses

        from trim.models import create_model, from_pretrained

        kwargs = {"task": cfg.task, "num_labels": cfg.num_labels, "trim": dataclasses.asdict(cfg.trim)}
        if cfg.family == "sam":  # a SAM checkpoint holds its whole architecture: its converters take no options
            model = from_pretrained(source)
        else:
            try:  # converters that can resize the image grid take the recipe's image size
                model = from_pretrained(source, image_size=cfg.vision.image_size, **kwargs)
            except TypeError:
                model = from_pretrained(source, **kwargs)
        got = dataclasses.asdict(model.config)
        diff = first_difference(got, dataclasses.asdict(cfg))
        if diff is None:
            return model
        arch = {k: v for k, v in got.items() if k not in ("trim", "task", "num_labels")}
        want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("trim", "task", "num_labels")}
        arch_diff = first_difference(arch, want)
        if arch_diff:
            raise ConfigError(f"model.pretrained={source!r} converts to a different architecture than the recipe "
                              f"describes (model.{arch_diff.replace(': ', ': converted ', 1).replace(' vs ', ', recipe ')}); "
                              "make the recipe's model fields match the source")
        # Same backbone, other head or trimmers (e.g. a trim directory): rebuild and copy what fits.
        fresh = create_model(cfg)
        added = transfer_weights(model, fresh, source=f"model.pretrained={source!r}")
        _little_from_big(fresh, added)
        log.info("started from %s (%d fresh head / trimmer tensors)", source, len(added))
        return fresh

    # -- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        started = time.time()
        apply_launcher_env()
        _configure_logging(main=rank_and_world()[0] == 0)
        plan = self.check()
        if plan.finished(r.train.steps):
            return self.already_done(plan)
        acc = make_accelerator(precision=r.train.precision, grad_accum=r.train.grad_accum,
                               deepspeed_config=plan.deepspeed, find_unused_parameters=r.train.find_unused_parameters)
        try:
            self.setup(acc, plan)
            self.train()
            return self.finish(started)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)

    def already_done(self, plan: Plan) -> dict[str, Any]:
        """``train.resume`` found a checkpoint at or past ``train.steps``: touch nothing, return its summary."""
        steps = self.recipe.train.steps
        log.info("%s is already at step %d (train.steps=%d): nothing to do; raise train.steps to train longer",
                 plan.resume_dir, plan.resume_step, steps)
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {
            "name": self.recipe.name, "run_dir": str(self.run_dir), "steps": plan.resume_step, "final_eval": None,
            "checkpoint": str(plan.resume_dir)}
        return {**summary, "is_main": rank_and_world()[0] == 0, "already_done": True}

    # -- setup ----------------------------------------------------------------------------
    def setup(self, acc: Any, plan: Plan) -> None:
        """Everything before the first step, in the order resuming needs (RNG restored last)."""
        from accelerate.utils import set_seed

        self.acc, self.use_ds = acc, plan.deepspeed is not None
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.objective = plan.objective
        self._setup_run_dir()
        set_seed(self.recipe.train.seed)  # identical initial weights on every rank
        self._setup_model()
        self._setup_optimizer()
        self._resume(plan.resume_dir)
        self._setup_data(plan.sources, plan.resume_dir)
        self.metrics = MetricsLog(self.run_dir, enabled=self.main,
                                  resume_step=self.step if plan.resume_dir is not None else None)

    def _setup_run_dir(self) -> None:
        r, acc = self.recipe, self.acc
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
            layout = f"DeepSpeed ({r.train.deepspeed})" if self.use_ds else "DDP" if self.world > 1 else "single process"
            log.info("run %s: %d process(es), %s, precision=%s, %s", self.run_dir, self.world, acc.device,
                     r.train.precision, layout)
        acc.wait_for_everyone()

    def _setup_model(self) -> None:
        self.model = self.build_model()
        self.teacher = None
        if self.objective.needs_teacher:
            def teacher(batch: dict, prefix: list | None) -> Any:  # the same weights with trimming off: self-distillation
                with torch.no_grad():
                    return self.unwrapped(batch, trim="off", resume=prefix)

            self.teacher = teacher

    def _setup_optimizer(self) -> None:
        t = self.recipe.train
        groups = self._groups(self.model, self.objective)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        self.base_lrs = [g["base_lr"] for g in groups]
        self.group_names = [g["name"] for g in groups]
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.unwrapped = self.acc.unwrap_model(self.model)
        self.ckpt = CheckpointIO(self.run_dir, self.acc, deepspeed=self.use_ds, keep_last=t.keep_last)

    def _resume(self, resume_dir: Path | None) -> None:
        state: dict[str, Any] = {"step": 0, "samples": 0, "data": {"epoch": 0, "batch_in_epoch": 0}}
        if resume_dir is not None:
            state = self.ckpt.load(resume_dir, model=self.model, optimizer=self.optimizer)
            self.objective.load_state_dict(state.get("objective", {}))
            if state.get("world_size", self.world) != self.world and self.recipe.data.rank_split == "shards":
                log.warning("resuming a %d-process run on %d processes with data.rank_split=shards: the data "
                            "position is approximate", state["world_size"], self.world)
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.data_state = state["data"]
        # Saved totals are global; under rank_split=shards the ranks' counts are summed, so one rank carries them.
        shared = self.recipe.data.rank_split == "batch" or self.rank == 0
        self.reads_before = state.get("train_reads", no_reads()) if shared else no_reads()
        self.last_saved = self.step if resume_dir is not None else -1
        self.objective.set_step(self.step)
        self.objective.sync_model(self.unwrapped)
        if self.main and resume_dir is not None:
            log.info("resumed from %s at step %d (target %.4f)", resume_dir, self.step, self.objective.target(self.step))

    def _setup_data(self, sources: DataSources, resume_dir: Path | None) -> None:
        from accelerate.utils import set_seed

        r = self.recipe
        train_factory, self.val_factory = sources.factories(seed=r.train.seed, world=self.world)
        self.stream = TrainStream(train_factory, rank=self.rank, world=self.world, per_rank=r.data.batch_size,
                                  split=r.data.rank_split)
        self.stream.load_state_dict(self.data_state)
        self.stream.start()  # before restoring RNG: opening a loader draws from torch's generator
        if resume_dir is None or not self.ckpt.load_rng(resume_dir):
            set_seed(r.train.seed + 1_000_003 * self.rank + self.step)  # Gumbel noise differs across ranks
        self.reduce_mean = global_mean(self.world)
        self.global_batch = r.data.batch_size * r.train.grad_accum * self.world

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm.auto import tqdm

        r = self.recipe
        self.bar = tqdm(total=r.train.steps, initial=self.step, desc=r.name, disable=not (self.main and r.train.progress),
                        dynamic_ncols=True, file=sys.stderr)
        self.window: dict[str, list[float]] = {}
        self.step_times: list[float] = []
        self.last_eval: dict[str, Any] | None = None
        self.calibration: dict[str, Any] | None = None
        self.model.train()
        while self.step < r.train.steps:
            self._train_step()
            self._after_step()
        self.bar.close()
        if self.last_saved != self.step:
            self.save_checkpoint()
        self.calibration = self.calibrate()

    def calibrate(self) -> dict[str, Any] | None:
        """Fit the final checkpoint's budget calibration on held-out inputs, so its mean eval cost
        is the target (`trim.prune.calibrate`). The main process fits on the checkpoint as saved
        (however the model was wrapped or sharded) and writes it into its config.json."""
        r = self.recipe
        if not self.objective.trains_trimmers or self.val_factory is None or not r.objective.calibration_samples:
            return None
        if r.model.config.family == "sam":
            if self.main:
                log.info("calibration skipped: the budget calibration (trim.prune.calibrate) covers the VL models' "
                         "token trimmers; the sam family has no calibrated budget knob")
            return None
        if not self.objective.calibrates:
            if self.main:
                log.info("calibration skipped (objective.method=%s): %s", r.objective.method, CALIBRATION_SKIPPED)
            return {"skipped": CALIBRATION_SKIPPED, "keep_ratio": model_keep_ratio(self.unwrapped)}
        result = None
        if self.main:
            step_dir = latest_checkpoint(self.run_dir)
            model = load_model(step_dir).to(self.acc.device).eval()
            inputs = held_out_inputs(self.val_factory(), MODEL_INPUTS, r.objective.calibration_samples)
            inputs = [{k: v.to(self.acc.device) for k, v in batch.items()} for batch in inputs]
            cal = calibrate(model, inputs, r.objective.target, source={"split": r.data.val_split})
            write_calibration(step_dir, cal)
            log.info("calibrated %s for target %.3f: logit shift %+.3f, mean cost %.4f on %d %s samples",
                     step_dir.name, cal.target, cal.shift, cal.mean_cost, cal.samples, r.data.val_split)
            result = {k: v for k, v in cal.to_dict().items() if k != "table"}
        self.acc.wait_for_everyone()
        return result

    def _train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches; its numbers go to the log window."""
        r = self.recipe
        t0 = time.perf_counter()
        factor = lr_factor(self.step, total=r.train.steps, warmup=r.train.warmup_steps, min_ratio=r.train.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        micro: dict[str, list[float]] = {}
        grad_norm = None
        for _ in range(r.train.grad_accum):
            batch = next(self.stream)
            with self.acc.accumulate(self.model):
                terms = self._loss_step(batch)
                clipped = self._optimizer_step()
            if clipped is not None:
                grad_norm = clipped
            for k, v in terms.items():
                micro.setdefault(k, []).append(v)
        if self.use_ds:
            grad_norm = self.model.get_global_grad_norm()
        self.step += 1
        self.samples += self.global_batch
        self.objective.set_step(self.step)
        self.objective.sync_model(self.unwrapped)
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        for k, v in micro.items():
            self.window.setdefault(k, []).append(sum(v) / len(v))
        self.window.setdefault("step_time", []).append(dt)
        if grad_norm is not None:
            self.window.setdefault("grad_norm", []).append(float(grad_norm))
        self.bar.update(1)
        fault_point("step", self.step)

    def _loss_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """Forward + backward of one micro-batch; returns the detached loss terms."""
        with self.acc.autocast():
            result = self.objective(self.model, batch, self.step, teacher=self.teacher, global_mean=self.reduce_mean)
        self.acc.backward(result.loss)
        return result.terms

    def _optimizer_step(self) -> Any:
        """Clip and step (accelerate / DeepSpeed skip it until the last micro-batch); the clipped norm or None."""
        clip = self.recipe.train.clip
        grad_norm = None
        if self.acc.sync_gradients and not self.use_ds and clip:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _after_step(self) -> None:
        t, step = self.recipe.train, self.step
        last = step == t.steps
        if step % t.log_every == 0 or last:
            self._log_train()
        if self.val_factory is not None:
            due = bool(t.eval_every) and step % t.eval_every == 0
            if due or (last and t.eval_at_end and (self.last_eval is None or self.last_eval["step"] != step)):
                self.last_eval = self.evaluate()
                self.metrics.write(self.last_eval)
        if (t.save_every and step % t.save_every == 0) or last:
            self.save_checkpoint()

    def _log_train(self) -> None:
        record = self._reduce_window(self.acc, self.window)
        record.update(kind="train", step=self.step, samples=self.samples, epoch=self.stream.epoch,
                      samples_per_s=self.global_batch / max(record["step_time"], 1e-9))
        for name, group in zip(self.group_names, self.optimizer.param_groups):
            if name in ("backbone", "trimmer"):
                record[f"lr/{name}"] = group["lr"]
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        self.metrics.write(record)
        self.bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "cost_ratio", "target") if k in record})
        self.window = {}

    @staticmethod
    def _reduce_window(acc: Any, window: dict[str, list[float]]) -> dict[str, float]:
        keys = sorted(window)
        values = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    def train_reads(self) -> dict[str, Any]:
        """Training samples read and skipped so far over all ranks (collective under rank_split=shards)."""
        local = add_reads(self.reads_before, self.stream.reads())
        if self.recipe.data.rank_split != "shards" or self.world == 1:
            return local  # the batch layout: every rank reads (and skips) the same samples
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, local)
        return add_reads(*gathered)

    # -- save / finish --------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """``step_<N>`` with the resolved recipe as config.json (collective: every rank calls it)."""
        recipe = self.recipe.to_dict()
        model_section = recipe.pop("model")
        config = {"model": {k: v for k, v in model_section.items() if k not in ("init_from", "pretrained")},
                  "model_source": {k: model_section.get(k) for k in ("init_from", "pretrained")}, **recipe}
        obj, step = self.objective, self.step
        state = {"step": step, "samples": self.samples, "data": self.stream.state_dict(),
                 "objective": obj.state_dict(), "target": obj.target(step), "tau": obj.tau(step),
                 "train_reads": self.train_reads()}
        self.ckpt.save(step, model=self.model, optimizer=self.optimizer, config=config, state=state)
        self.last_saved = step

    def finish(self, started: float) -> dict[str, Any]:
        """Close the logs and write ``summary.json`` (rank 0); every rank returns the summary."""
        self.metrics.close()
        times = self.step_times
        reads = self.train_reads()
        summary = {
            "name": self.recipe.name, "run_dir": str(self.run_dir), "is_main": self.main, "steps": self.step,
            "samples": self.samples, "processes": self.world,
            "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(sum(times), 3),
            "step_time_median_s": statistics.median(times[len(times) // 10:]) if times else None,
            "train_reads": reads,
            "final_eval": self.last_eval, "calibration": self.calibration,
            "checkpoint": str(latest_checkpoint(self.run_dir)),
        }
        if reads["skipped"] and self.main:
            log.warning("training skipped %d corrupt samples (%s); see the trim.data warnings for shard and key",
                        sum(reads["skipped"].values()), ", ".join(f"{n} {k}" for k, n in reads["skipped"].items()))
        if self.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.acc.wait_for_everyone()
        return summary

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Accuracy and cost ratio on (at most ``data.val_samples`` of) the val split, with what was skipped."""
        r, acc = self.recipe, self.acc
        trim_mode = self.objective.eval_trim()
        t0 = time.perf_counter()
        was_training = self.unwrapped.training
        self.unwrapped.eval()
        loader = self.val_factory()
        with torch.no_grad():
            sums = self._eval_sums(loader, trim_mode)
        if was_training:
            self.unwrapped.train()
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device)
        if self.world > 1:
            values = acc.reduce(values, reduction="sum")
        total = dict(zip(keys, values.tolist()))
        count = max(total["count"], 1.0)
        if "objects" in total:  # seg: mean IoU over objects
            objects = max(total["objects"], 1.0)
            scores = {"box_miou": total["box_iou"] / objects, "click_miou": total["click_iou"] / objects,
                      "objects": int(total["objects"])}
        else:
            scores = {"accuracy": total["correct"] / count}
        expected = loader.manifest_samples() if hasattr(loader, "manifest_samples") else None
        if expected is not None and r.data.val_samples is not None:
            expected = min(expected, r.data.val_samples)
        reads = loader.stats.as_dict() if hasattr(loader, "stats") else no_reads()
        record = {"kind": "eval", "split": r.data.val_split, "step": self.step, "trim": trim_mode,
                  **scores, "cost_ratio": total["cost"] / count,
                  "samples": int(total["count"]), "samples_expected": expected, "skipped": reads["skipped"],
                  "shard_errors": reads["shard_errors"], "train_skipped": self.train_reads()["skipped"],
                  "eval_time_s": round(time.perf_counter() - t0, 3)}
        record.update({k: total[k] / count for k in keys if k.startswith("kept_")})
        self._log_eval(record)
        return record

    def _eval_sums(self, loader: Any, trim_mode: str) -> dict[str, float]:
        """This rank's sums of hits, rows, cost and kept counts over its slice of every val batch."""
        task, cap = self.recipe.model.config.task, self.recipe.data.val_samples
        sums: dict[str, float] = {"count": 0.0, "cost": 0.0, **({"objects": 0.0} if task == "seg" else {"correct": 0.0})}
        seen = 0
        for full in loader:
            n = batch_size_of(full)
            if cap is not None:
                if seen >= cap:
                    break
                n = min(n, cap - seen)
            seen += n
            start, stop = rank_slice(n, self.rank, self.world)
            weight = 1.0
            if stop <= start:  # this rank has no rows: run one anyway so collectives stay aligned
                start, stop, weight = 0, 1, 0.0
            part = slice_batch(full, start, stop)
            rows = float(stop - start) * weight
            if task == "seg":
                with self.acc.autocast():
                    part_sums = seg_eval_sums(self.unwrapped, part, trim_mode)
                sums["count"] += rows
                for k, v in part_sums.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                continue
            with self.acc.autocast():
                out = self.unwrapped(part, trim=trim_mode)
            logits = out.logits.float()
            if task == "vqa":
                hit = part["labels"].float().gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
            else:
                hit = (logits.argmax(-1) == part["labels"]).float()
            sums["correct"] += float(hit.sum()) * weight
            sums["count"] += rows
            sums["cost"] += float(out.cost_ratio.float().sum()) * weight
            for k, v in kept_counts(out.records).items():
                sums[k] = sums.get(k, 0.0) + v * rows
        return sums

    def _log_eval(self, record: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        log.info("step %d %s: %s, cost ratio %.4f (%d samples, trim=%s)", record["step"], record["split"],
                 eval_headline(record), record["cost_ratio"], record["samples"], record["trim"])
        expected = record["samples_expected"]
        if record["skipped"] or (expected is not None and record["samples"] < expected):
            reasons = ", ".join(f"{n} {k}" for k, n in record["skipped"].items()) or "none skipped"
            log.warning("step %d %s: scores on %d of %s samples (%s, %d shards cut short)", record["step"],
                        record["split"], record["samples"], expected if expected is not None else "?", reasons,
                        record["shard_errors"])


def _configure_logging(*, main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)


def train(recipe: Recipe) -> dict[str, Any]:
    """Run a validated recipe to its last step (or continue it); returns the run summary."""
    return Trainer(recipe).run()
