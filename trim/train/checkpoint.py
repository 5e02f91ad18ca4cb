"""Training checkpoints: one directory per saved step, written atomically.

::

    runs/<name>/
      recipe.yaml             the resolved recipe of the latest start
      latest                  text file: the name of the newest complete checkpoint ("step_400")
      step_400/
        config.json           {"model": ModelConfig, "name", "data", "train", "objective", ...}:
                              the full resolved recipe; trim.models.load_model reads it as is
        model.safetensors     the weights (gathered from all ranks under ZeRO-3)
        trainer_state.json    step, samples seen, data position, objective (curriculum) state
        optimizer.pt          AdamW state (DDP / single process; rank 0 writes it)
        deepspeed/            DeepSpeed engine checkpoint (ZeRO shards) instead of optimizer.pt
        rng_rank<r>.pt        python / numpy / torch RNG state of each rank

A checkpoint is written to ``step_<N>.tmp`` (every rank adds its files), then renamed to
``step_<N>`` by rank 0 once all ranks are done, and only then is ``latest`` replaced (also
by rename). A process killed at any point leaves either the previous complete checkpoint
or the new one behind, never a half-written ``step_<N>``; stale ``*.tmp`` directories are
removed by the next save.

The run folder must be on a file system all ranks see (as on a cluster's shared storage).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from trim.errors import CheckpointError
from trim.models.io import CONFIG_NAME, LATEST_NAME, WEIGHTS_NAME, load_weights, read_weights

LATEST = LATEST_NAME
STATE_NAME, OPTIMIZER_NAME = "trainer_state.json", "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names (falling back to the newest complete one)."""
    run = Path(run_dir)
    pointer = run / LATEST
    if pointer.is_file():
        target = run / pointer.read_text().strip()
        if (target / STATE_NAME).is_file():
            return target
    done = list_checkpoints(run)
    return done[-1] if done else None


def fault_point(where: str, step: int) -> None:
    """Test hook: ``TRIM_FAULT=<where>:<step>`` SIGKILLs this process there (crash-safety tests)."""
    spec = os.environ.get("TRIM_FAULT", "")
    if spec and spec == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointIO:
    """Saves and restores the training state under ``run_dir`` for every rank."""

    def __init__(self, run_dir: Path, accelerator: Any, *, deepspeed: bool, keep_last: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.deepspeed = deepspeed
        self.keep_last = keep_last

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def save(self, step: int, *, model: Any, optimizer: Any, config: dict[str, Any], state: dict[str, Any]) -> Path:
        """Write ``step_<step>`` (collective: every rank must call it)."""
        acc = self.acc
        final = self.run_dir / step_dir_name(step)
        tmp = self.run_dir / f"{step_dir_name(step)}.tmp"
        if self.is_main:
            for stale in self.run_dir.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()

        weights = acc.get_state_dict(model)  # collective under ZeRO-3 (gathers the shards)
        if self.is_main:
            weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            save_file(weights, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        del weights
        fault_point("save", step)  # the crash test kills here: weights written, checkpoint incomplete
        if self.deepspeed:
            model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
        elif self.is_main:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        torch.save(rng_state(), tmp / f"rng_rank{acc.process_index}.pt")
        if self.is_main:
            scaler = getattr(acc, "scaler", None)
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            # The state file marks the directory complete: written last, after everything else.
            (tmp / STATE_NAME).write_text(json.dumps({**state, "world_size": acc.num_processes}, indent=2) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            if final.exists():  # only after a resume from an older step re-reached this one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.run_dir)
            _atomic_write_text(self.run_dir / LATEST, final.name + "\n")
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        done = list_checkpoints(self.run_dir)
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, step_dir: Path, *, model: Any, optimizer: Any) -> dict[str, Any]:
        """Restore weights and optimizer (all ranks); return the trainer state. RNG: see `load_rng`."""
        step_dir = Path(step_dir)
        state_path = step_dir / STATE_NAME
        if not state_path.is_file():
            raise CheckpointError(f"{step_dir} has no {STATE_NAME}; it is not a complete training checkpoint")
        state = json.loads(state_path.read_text())
        if self.deepspeed:
            if not (step_dir / DEEPSPEED_TAG).is_dir():
                raise CheckpointError(f"{step_dir} was not written by a DeepSpeed run (no {DEEPSPEED_TAG}/); resume it "
                                      "with train.deepspeed=null, or start a new run with init_from")
            path, _ = model.load_checkpoint(str(step_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {step_dir / DEEPSPEED_TAG}")
        else:
            if not (step_dir / OPTIMIZER_NAME).is_file():
                raise CheckpointError(f"{step_dir} has no {OPTIMIZER_NAME} (written by a DeepSpeed run?); resume it "
                                      "with the same train.deepspeed setting")
            weights = step_dir / WEIGHTS_NAME
            load_weights(self.acc.unwrap_model(model), read_weights(weights), source=str(weights))
            optimizer.load_state_dict(torch.load(step_dir / OPTIMIZER_NAME, map_location="cpu", weights_only=False))
            scaler = getattr(self.acc, "scaler", None)
            if scaler is not None and (step_dir / "scaler.pt").is_file():
                scaler.load_state_dict(torch.load(step_dir / "scaler.pt", weights_only=False))
        return state

    def load_rng(self, step_dir: Path) -> bool:
        """Restore this rank's RNG; False when the checkpoint has none for it (world size changed)."""
        path = Path(step_dir) / f"rng_rank{self.acc.process_index}.pt"
        if not path.is_file():
            return False
        set_rng_state(torch.load(path, weights_only=False))
        return True
