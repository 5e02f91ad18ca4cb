"""Processes and devices: launcher environments, the Accelerator, DeepSpeed configs.

One entry point serves every launcher. torchrun, ``accelerate launch`` and the
``deepspeed`` launcher set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; under
``srun`` with one task per device only ``SLURM_*`` is set, and `apply_launcher_env` maps
it (``MASTER_ADDR`` from the first node of the job unless exported). A plain
``python``/``trim train`` is one process.

On machines without CUDA the Accelerator runs on CPU with the gloo backend (DDP). DeepSpeed
on CPU also needs gloo: accelerate only initialises DeepSpeed's process group for GPUs, so
we pass ``backend="gloo"`` through ``InitProcessGroupKwargs``, which makes it take the
DeepSpeed path anyway. DeepSpeed's shared-memory CPU all-reduce kernel is JIT-compiled on
first use (minutes); plain gloo collectives are used instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from trim.errors import ConfigError

_DS_OWNED = ("optimizer", "scheduler")


def apply_launcher_env() -> None:
    """Fill torch.distributed's env variables from SLURM when launched by ``srun`` directly."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if ntasks <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        env["LOCAL_WORLD_SIZE"] = per_node
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))


def _first_slurm_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # "node[01-04,07],gpu5" -> "node01" without scontrol
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_deepspeed_config(path: str, *, batch_size: int, grad_accum: int, clip: float | None, precision: str,
                          world: int) -> dict[str, Any]:
    """Read a launch/deepspeed JSON and fill its ``"auto"`` values from the recipe.

    The recipe owns batch size, accumulation, clipping, precision, optimizer and schedule;
    the JSON owns the ZeRO stage and its bucket / offload settings.
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"train.deepspeed={path!r} cannot be read as JSON ({err})") from err
    for key in _DS_OWNED:
        if key in cfg:
            raise ConfigError(f"train.deepspeed={path!r} defines '{key}'; remove it: the recipe's train.* sets the "
                              "AdamW optimizer (with its trimmer learning rate) and the warm-up + cosine schedule")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed={path!r}: zero_optimization.stage={stage!r}; choose 0, 1, 2 or 3")
    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world,
        "gradient_clipping": float(clip or 0.0),
    }
    for key, value in wanted.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif cfg[key] != value:
            raise ConfigError(f"train.deepspeed={path!r} sets {key}={cfg[key]} but the recipe implies {value}; "
                              f"write \"auto\" in the JSON and set it in the recipe")
    for name, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = cfg.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
        elif bool(section["enabled"]) != on:
            raise ConfigError(f"train.deepspeed={path!r} has {name}.enabled={section['enabled']} but "
                              f"train.precision={precision!r}; set it to \"auto\"")
    if stage == 3:
        cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return cfg


def _skip_deepspeed_shm_kernel() -> None:
    import importlib

    try:  # by module path: ``deepspeed.comm.torch`` as an attribute is the torch package itself
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


def check_devices(*, precision: str, deepspeed_config: dict | None) -> None:
    """What this machine cannot run, found before any process group or model exists."""
    if torch.cuda.is_available():
        return
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if deepspeed_config is not None and deepspeed_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError("train.deepspeed: ZeRO stage 3 does not run on DeepSpeed's CPU accelerator (0.19's ZeRO-3 "
                          "optimizer step calls CUDA-only record_stream on the gradients); on a machine without "
                          "CUDA use launch/deepspeed/zero2.json")


def make_accelerator(*, precision: str, grad_accum: int, deepspeed_config: dict | None,
                     find_unused_parameters: bool = False) -> Any:
    """An Accelerator for this process (DDP, or DeepSpeed when a config is given)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    check_devices(precision=precision, deepspeed_config=deepspeed_config)
    cuda = torch.cuda.is_available()
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state per run (tests run several)
    handlers: list[Any] = []
    if deepspeed_config is None:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters))
        return Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                           kwargs_handlers=handlers)
    from accelerate.utils import DeepSpeedPlugin

    if "LOCAL_RANK" not in os.environ:  # a plain process: DeepSpeed still wants a (1-process) group
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not cuda:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        _skip_deepspeed_shm_kernel()
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config)
    return Accelerator(deepspeed_plugin=plugin, mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=handlers)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        torch.distributed.all_reduce(out)
        return out


def global_mean(world: int):
    """Mean over ranks that gradients flow through (identity for one process).

    With every rank adding ``f(global mean)`` to its loss and DDP averaging gradients over
    ranks, each rank's parameters receive exactly the gradient of ``f`` of the global batch.
    """
    if world <= 1:
        return lambda x: x
    return lambda x: _AllReduceSum.apply(x) / world
