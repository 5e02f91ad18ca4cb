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

Loading runs no code from the checkpoint. ``optimizer.pt``, ``scaler.pt`` and
``rng_rank<r>.pt`` are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, so a crafted pickle in a run folder cannot execute anything on
``train.resume=latest`` (the RNG states are stored as tensors and numbers for this
reason). A file that needs anything else is refused with a `CheckpointError` naming it.
DeepSpeed's engine unpickles its own files with ``weights_only=False``; before handing
``deepspeed/`` to it, every ``*.pt`` there is read once with ``weights_only=True``
(memory-mapped, so no tensor data is copied) allowing only the few DeepSpeed classes its
ZeRO checkpoints hold (`DEEPSPEED_SAFE_GLOBALS`). A file that fails is refused the same
way. The check and DeepSpeed's read are two opens of the same file: someone who can
rewrite the run folder *while* the job starts can still swap it in between, so a run
folder must not be writable by anyone you would not let run code as you.
"""

from __future__ import annotations

import json
import os
import pickle
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

STATE_NAME, OPTIMIZER_NAME, SCALER_NAME = "trainer_state.json", "optimizer.pt", "scaler.pt"
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
    pointer = run / LATEST_NAME
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


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers: loadable with ``weights_only=True``."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_plain(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` that runs no code from the file: tensors and plain containers only.

    Everything trim writes is plain data; a file that needs another class is either from a
    foreign tool or crafted, and unpickling it could execute anything, so it is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, so it was not loaded (unpickling it could run "
            f"code: {first[:200]}). If you wrote it with an older trim, delete it (for rng_rank*.pt: the run resumes "
            "with fresh random state) or start a new run from the weights with model.init_from") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is damaged: "
                              "resume from an earlier step_<N> (train.resume=<run>/step_<N>)") from err


def _deepspeed_safe_globals() -> list[Any]:
    """Classes DeepSpeed's ZeRO checkpoints pickle besides tensors (loss scaler, stage enum, fragment map)."""
    import importlib

    found = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: its files are then refused, naming the class
    return found


# (module, name) of the non-plain objects DeepSpeed 0.19 pickles into its ZeRO checkpoints
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on a ZeRO-2 run's files).
# Each is a data holder rebuilt from its fields; none runs code of the file's choosing.
DEEPSPEED_SAFE_GLOBALS: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def verify_deepspeed_files(ds_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint with a file that would run code when DeepSpeed unpickles it."""
    allowed = _deepspeed_safe_globals()
    with torch.serialization.safe_globals(allowed):
        for path in sorted(Path(ds_dir).rglob("*.pt")):
            load_plain(path, mmap=True)


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
        torch.save(rng_state(), tmp / rng_name(acc.process_index))
        if self.is_main:
            scaler = getattr(acc, "scaler", None)
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / SCALER_NAME)
            # The state file marks the directory complete: written last, after everything else.
            (tmp / STATE_NAME).write_text(json.dumps({**state, "world_size": acc.num_processes}, indent=2) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            if final.exists():  # only after a resume from an older step re-reached this one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.run_dir)
            _atomic_write_text(self.run_dir / LATEST_NAME, final.name + "\n")
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
            self._load_deepspeed(step_dir, model)
        else:
            self._load_ddp(step_dir, model, optimizer)
        return state

    def _load_deepspeed(self, step_dir: Path, model: Any) -> None:
        if not (step_dir / DEEPSPEED_TAG).is_dir():
            raise CheckpointError(f"{step_dir} was not written by a DeepSpeed run (no {DEEPSPEED_TAG}/); resume it "
                                  "with train.deepspeed=null, or start a new run with init_from")
        verify_deepspeed_files(step_dir / DEEPSPEED_TAG)
        path, _ = model.load_checkpoint(str(step_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {step_dir / DEEPSPEED_TAG}")

    def _load_ddp(self, step_dir: Path, model: Any, optimizer: Any) -> None:
        if not (step_dir / OPTIMIZER_NAME).is_file():
            raise CheckpointError(f"{step_dir} has no {OPTIMIZER_NAME} (written by a DeepSpeed run?); resume it "
                                  "with the same train.deepspeed setting")
        # Every file is read (and refused if unsafe) before anything is restored.
        optimizer_state = load_plain(step_dir / OPTIMIZER_NAME)
        scaler = getattr(self.acc, "scaler", None)
        scaler_state = None
        if scaler is not None and (step_dir / SCALER_NAME).is_file():
            scaler_state = load_plain(step_dir / SCALER_NAME)
        weights = step_dir / WEIGHTS_NAME
        load_weights(self.acc.unwrap_model(model), read_weights(weights), source=str(weights))
        optimizer.load_state_dict(optimizer_state)
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)

    def load_rng(self, step_dir: Path) -> bool:
        """Restore this rank's RNG; False when the checkpoint has none for it (world size changed)."""
        path = Path(step_dir) / rng_name(self.acc.process_index)
        if not path.is_file():
            return False
        set_rng_state(load_plain(path))
        return True
