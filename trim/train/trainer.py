"""The training loop: a thin layer over accelerate (DDP) or DeepSpeed.

    recipe -> Accelerator -> model (create / init_from / pretrained) -> AdamW (trimmers on
    their own learning rate) -> resume -> for each optimizer step: grad_accum micro-batches
    of objective(model, batch) -> clip -> step -> log / evaluate / checkpoint

Everything that decides what a run computes lives in the recipe; this file only orders
the work. Step numbers count optimizer steps; step ``s`` (1-based in the logs) uses the
curriculum target and Gumbel temperature of ``s - 1`` completed steps, so a run resumed
from ``step_<N>`` continues with exactly the target step ``N + 1`` would have had.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trim.config import Recipe, resolve_checkpoint
from trim.errors import CheckpointError, ConfigError
from trim.models.io import WEIGHTS_NAME, load_weights, read_weights, transfer_weights, trimmer_keys
from trim.train.checkpoint import CheckpointIO, fault_point, latest_checkpoint, list_checkpoints
from trim.train.data import DataSources, TrainStream, batch_size_of, rank_slice, slice_batch
from trim.train.distributed import (apply_launcher_env, global_mean, load_deepspeed_config, make_accelerator,
                                    world_size_from_env)
from trim.train.objectives import Objective, build_objective, kept_counts

log = logging.getLogger("trim.train")


# ----------------------------------------------------------------------------- small pieces


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, *, lr: float, trimmer_lr: float, weight_decay: float,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: backbone / trimmers x decay / no decay (biases, norms: 1-d tensors) x lr multiplier.

    ``lr_mult`` maps parameter-name prefixes to multipliers of ``lr`` (the longest matching
    prefix wins; trimmers always use ``trimmer_lr``). A prefix that matches nothing is an error.
    """
    lr_mult = dict(lr_mult or {})
    used = dict.fromkeys(lr_mult, False)
    trimmer_ids = {id(p) for p in model.trimmer_parameters()} if hasattr(model, "trimmer_parameters") else set()
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


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.run_dir = recipe.run_dir

    # -- before any process group exists --------------------------------------------------
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
        if not (step_dir / "trainer_state.json").is_file():
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

    # -- the model ------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from trim.models import create_model

        sec = self.recipe.model
        if sec.pretrained:
            return self._from_pretrained(sec.pretrained, sec.config)
        model = create_model(sec.config)
        if sec.init_from:
            weights = Path(sec.init_from) / WEIGHTS_NAME
            added = load_weights(model, read_weights(weights), source=str(weights), fresh=trimmer_keys(model))
            log.info("initialised from %s (%d new trimmer tensors)", sec.init_from, len(added))
        return model

    @staticmethod
    def _from_pretrained(source: str, cfg: Any) -> torch.nn.Module:
        """Convert ``source`` for the recipe's task and trimmers; its architecture must be the recipe's."""
        import dataclasses

        from trim.models import create_model, from_pretrained

        kwargs = {"task": cfg.task, "num_labels": cfg.num_labels, "trim": dataclasses.asdict(cfg.trim)}
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
        log.info("started from %s (%d fresh head / trimmer tensors)", source, len(added))
        return fresh

    # -- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        started = time.time()
        apply_launcher_env()
        resume_dir = self.plan_resume()
        if resume_dir is not None:
            self.check_compatible(resume_dir)
        sources = DataSources(r.data)  # metadata only: shard lists, tokenizer, answers
        sources.check(r.model.config)
        world_hint = world_size_from_env()
        ds_config = None
        if r.train.deepspeed:
            ds_config = load_deepspeed_config(r.train.deepspeed, batch_size=r.data.batch_size,
                                              grad_accum=r.train.grad_accum, clip=r.train.clip,
                                              precision=r.train.precision, world=world_hint)
        acc = make_accelerator(precision=r.train.precision, grad_accum=r.train.grad_accum,
                               deepspeed_config=ds_config, find_unused_parameters=r.train.find_unused_parameters)
        try:
            return self._run(acc, sources, resume_dir, ds_config is not None, started)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)

    def _run(self, acc: Any, sources: DataSources, resume_dir: Path | None, use_ds: bool, started: float) -> dict[str, Any]:
        from accelerate.utils import set_seed

        r = self.recipe
        rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
        logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                            stream=sys.stderr)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
            log.info("run %s: %d process(es), %s, precision=%s, %s", self.run_dir, world, acc.device, r.train.precision,
                     f"DeepSpeed ({r.train.deepspeed})" if use_ds else "DDP" if world > 1 else "single process")
        acc.wait_for_everyone()

        set_seed(r.train.seed)  # identical initial weights on every rank
        model = self.build_model()
        objective = build_objective(r.objective, r.model.config.task)
        if not objective.trains_trimmers:
            for p in model.trimmer_parameters():
                p.requires_grad_(False)
        groups = param_groups(model, lr=r.train.lr, trimmer_lr=r.train.trimmer_lr or r.train.lr,
                              weight_decay=r.train.weight_decay, lr_mult=r.train.lr_mult)
        optimizer = torch.optim.AdamW(groups, lr=r.train.lr, betas=tuple(r.train.betas), eps=r.train.eps)
        base_lrs = [g["base_lr"] for g in groups]
        group_names = [g["name"] for g in groups]
        model, optimizer = acc.prepare(model, optimizer)
        unwrapped = acc.unwrap_model(model)

        ckpt = CheckpointIO(self.run_dir, acc, deepspeed=use_ds, keep_last=r.train.keep_last)
        state: dict[str, Any] = {"step": 0, "samples": 0, "data": {"epoch": 0, "batch_in_epoch": 0}}
        if resume_dir is not None:
            state = ckpt.load(resume_dir, model=model, optimizer=optimizer)
            objective.load_state_dict(state.get("objective", {}))
            if state.get("world_size", world) != world and r.data.rank_split == "shards":
                log.warning("resuming a %d-process run on %d processes with data.rank_split=shards: the data "
                            "position is approximate", state["world_size"], world)
        step = int(state["step"])
        objective.set_step(step)
        samples = int(state["samples"])
        if main and resume_dir is not None:
            log.info("resumed from %s at step %d (target %.4f)", resume_dir, step, objective.target(step))

        train_factory, val_factory = sources.factories(seed=r.train.seed, world=world)
        stream = TrainStream(train_factory, rank=rank, world=world, per_rank=r.data.batch_size,
                             split=r.data.rank_split)
        stream.load_state_dict(state["data"])
        stream.start()  # before restoring RNG: opening a loader draws from torch's generator
        if resume_dir is None or not ckpt.load_rng(resume_dir):
            set_seed(r.train.seed + 1_000_003 * rank + step)  # Gumbel noise differs across ranks

        metrics = MetricsLog(self.run_dir, enabled=main, resume_step=step if resume_dir is not None else None)
        teacher = None
        if objective.needs_teacher:
            def teacher(batch: dict) -> Any:
                with torch.no_grad():
                    return unwrapped(batch, trim="off")
        reduce_mean = global_mean(world)
        global_batch = r.data.batch_size * r.train.grad_accum * world
        warmup = r.train.warmup_steps

        from tqdm.auto import tqdm

        bar = tqdm(total=r.train.steps, initial=step, desc=r.name, disable=not (main and r.train.progress),
                   dynamic_ncols=True, file=sys.stderr)
        window: dict[str, list[float]] = {}
        step_times: list[float] = []
        last_eval: dict[str, Any] | None = None
        last_saved = step if resume_dir is not None else -1
        model.train()
        while step < r.train.steps:
            t0 = time.perf_counter()
            factor = lr_factor(step, total=r.train.steps, warmup=warmup, min_ratio=r.train.min_lr_ratio)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            micro: dict[str, list[float]] = {}
            grad_norm = None
            for _ in range(r.train.grad_accum):
                batch = next(stream)
                with acc.accumulate(model):
                    with acc.autocast():
                        result = objective(model, batch, step, teacher=teacher, global_mean=reduce_mean)
                    acc.backward(result.loss)
                    if acc.sync_gradients and not use_ds and r.train.clip:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), r.train.clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in result.terms.items():
                    micro.setdefault(k, []).append(v)
            if use_ds:
                grad_norm = model.get_global_grad_norm()
            step += 1
            samples += global_batch
            objective.set_step(step)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            for k, v in micro.items():
                window.setdefault(k, []).append(sum(v) / len(v))
            window.setdefault("step_time", []).append(dt)
            if grad_norm is not None:
                window.setdefault("grad_norm", []).append(float(grad_norm))
            bar.update(1)
            fault_point("step", step)

            if step % r.train.log_every == 0 or step == r.train.steps:
                record = self._reduce_window(acc, window)
                record.update(kind="train", step=step, samples=samples, epoch=stream.epoch,
                              samples_per_s=global_batch / max(record["step_time"], 1e-9))
                for name, group in zip(group_names, optimizer.param_groups):
                    if name in ("backbone", "trimmer"):
                        record[f"lr/{name}"] = group["lr"]
                record["lr"] = optimizer.param_groups[0]["lr"]
                metrics.write(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "cost_ratio", "target") if k in record})
                window = {}
            if val_factory is not None and r.train.eval_every and step % r.train.eval_every == 0:
                last_eval = self.evaluate(acc, unwrapped, val_factory, objective, step)
                metrics.write(last_eval)
            if step == r.train.steps and val_factory is not None and r.train.eval_at_end and (
                    last_eval is None or last_eval["step"] != step):
                last_eval = self.evaluate(acc, unwrapped, val_factory, objective, step)
                metrics.write(last_eval)
            if (r.train.save_every and step % r.train.save_every == 0) or step == r.train.steps:
                self.save(ckpt, step, model, optimizer, objective, stream, samples)
                last_saved = step
        bar.close()
        if last_saved != step:
            self.save(ckpt, step, model, optimizer, objective, stream, samples)
        metrics.close()
        summary = {
            "name": r.name, "run_dir": str(self.run_dir), "is_main": main, "steps": step, "samples": samples, "processes": world,
            "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(sum(step_times), 3),
            "step_time_median_s": statistics.median(step_times[len(step_times) // 10:]) if step_times else None,
            "final_eval": last_eval, "checkpoint": str(latest_checkpoint(self.run_dir)),
        }
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        return summary

    @staticmethod
    def _reduce_window(acc: Any, window: dict[str, list[float]]) -> dict[str, float]:
        keys = sorted(window)
        values = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    def save(self, ckpt: CheckpointIO, step: int, model: Any, optimizer: Any, objective: Objective,
             stream: TrainStream, samples: int) -> None:
        recipe = self.recipe.to_dict()
        model_section = recipe.pop("model")
        config = {"model": {k: v for k, v in model_section.items() if k not in ("init_from", "pretrained")},
                  "model_source": {k: model_section.get(k) for k in ("init_from", "pretrained")}, **recipe}
        state = {"step": step, "samples": samples, "data": stream.state_dict(), "objective": objective.state_dict(),
                 "target": objective.target(step), "tau": objective.tau(step)}
        ckpt.save(step, model=model, optimizer=optimizer, config=config, state=state)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, acc: Any, model: torch.nn.Module, val_factory: Any, objective: Objective,
                 step: int) -> dict[str, Any]:
        """Accuracy and cost ratio on (at most ``data.val_samples`` of) the val split."""
        r = self.recipe
        rank, world = acc.process_index, acc.num_processes
        trim_mode = objective.eval_trim()
        task = r.model.config.task
        cap = r.data.val_samples
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {"correct": 0.0, "count": 0.0, "cost": 0.0}
        kept: dict[str, float] = {}
        seen = 0
        with torch.no_grad():
            for full in val_factory():
                n = batch_size_of(full)
                if cap is not None:
                    if seen >= cap:
                        break
                    n = min(n, cap - seen)
                seen += n
                start, stop = rank_slice(n, rank, world)
                weight = 1.0
                if stop <= start:  # this rank has no rows: run one anyway so collectives stay aligned
                    start, stop, weight = 0, 1, 0.0
                part = slice_batch(full, start, stop)
                with acc.autocast():
                    out = model(part, trim=trim_mode)
                logits = out.logits.float()
                if task == "vqa":
                    hit = part["labels"].float().gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
                else:
                    hit = (logits.argmax(-1) == part["labels"]).float()
                rows = float(stop - start) * weight
                sums["correct"] += float(hit.sum()) * weight
                sums["count"] += rows
                sums["cost"] += float(out.cost_ratio.float().sum()) * weight
                for k, v in kept_counts(out.records).items():
                    kept[k] = kept.get(k, 0.0) + v * rows
        if was_training:
            model.train()
        keys = sorted(sums) + sorted(kept)
        values = torch.tensor([sums.get(k, kept.get(k, 0.0)) for k in keys], dtype=torch.float64, device=acc.device)
        if world > 1:
            values = acc.reduce(values, reduction="sum")
        total = dict(zip(keys, values.tolist()))
        count = max(total["count"], 1.0)
        record = {"kind": "eval", "split": r.data.val_split, "step": step, "trim": trim_mode,
                  "accuracy": total["correct"] / count, "cost_ratio": total["cost"] / count,
                  "samples": int(total["count"]), "eval_time_s": round(time.perf_counter() - t0, 3)}
        record.update({k: total[k] / count for k in sorted(kept)})
        if acc.is_main_process:
            log.info("step %d %s: accuracy %.4f, cost ratio %.4f (%d samples, trim=%s)", step, r.data.val_split,
                     record["accuracy"], record["cost_ratio"], record["samples"], trim_mode)
        return record


def train(recipe: Recipe) -> dict[str, Any]:
    """Run a validated recipe to its last step (or continue it); returns the run summary."""
    return Trainer(recipe).run()
