"""The process group of `trim eval`: rank, world and device, and gathering every rank's results.

Rank and world come from `trim.ranks` (the one place they are read). Under torchrun
(``WORLD_SIZE > 1``) the group is initialised from the environment: nccl on GPUs (each rank
on ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trim.errors import ConfigError
from trim.eval.errors import EvalError
from trim.ranks import local_rank, rank_and_world


@dataclass
class ProcessGroup:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created: bool = False  # open_group initialised torch.distributed (and close tears it down)

    def gather_results(self, work: Callable[[], Any]) -> list[Any]:
        """Run ``work`` on every rank; the list of every rank's result, in rank order.

        A rank whose ``work`` fails still reaches the gather (otherwise the others wait there
        forever) and every rank then raises `EvalError` naming the failed ranks.
        """
        try:
            mine: tuple[str, Any] = ("ok", work())
        except Exception as exn:
            if self.world == 1:
                raise
            mine = ("error", f"rank {self.rank}: {type(exn).__name__}: {exn}")
        parts = self._gather(mine)
        failed = [value for status, value in parts if status == "error"]
        if failed:
            raise EvalError("evaluation failed on " + "; ".join(failed))
        return [value for _, value in parts]

    def _gather(self, payload: Any) -> list[Any]:
        if self.world == 1:
            return [payload]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, payload)
        return out

    def close(self) -> None:
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.created = False


def open_group(device: str | None) -> ProcessGroup:
    """This process's place in the run; initialises the process group from torchrun's environment."""
    use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if rank_and_world()[1] == 1:
        return ProcessGroup(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    dev = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    rank, world = rank_and_world()
    return ProcessGroup(rank, world, dev, created)
