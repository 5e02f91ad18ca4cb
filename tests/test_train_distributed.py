"""Real multi-process training on this machine: gloo DDP, DeepSpeed ZeRO-2, two "nodes" on
loopback, and a SIGKILL in the middle of a run. Every run is a real launcher in a subprocess.

Tolerances: DDP with 2 processes at the same global batch reproduces the 1-process loss
curve to rtol 1e-4 (observed ~1e-7: the only difference is the order of float sums in
the gradient all-reduce). Resumed runs reproduce the uninterrupted run to rtol 1e-5 (same
process layout, so they are in fact bit-identical).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from trim.data import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(out, {"train": 64, "val": 24}, tasks=("vqa",), image_size=32, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRIM_FAULT"):
        e.pop(key, None)
    return e


def write_recipe(tmp: Path, shapes: Path, name: str, *, method: str = "smarttrim", steps: int = 6, batch: int = 8,
                 **train) -> Path:
    raw = {
        "name": name,
        "output_dir": str(tmp / "runs"),
        "model": {
            "family": "dual", "task": "vqa", "num_labels": 25,
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
            "text": {"vocab_size": 256, "width": 32, "layers": 2, "heads": 2},
            "cross_layers": 2, "cross_width": 32, "cross_heads": 2,
            "trim": {"vision_token_layers": [1], "cross_token_layers": [0, 1], "cross_head_layers": [0, 1]}
            if method != "none" else {},
        },
        "data": {"root": str(shapes), "task": "vqa", "image_size": 32, "batch_size": batch, "shuffle_buffer": 32},
        "train": {"steps": steps, "lr": 1e-3, "trimmer_lr": 1e-2, "warmup": 1, "save_every": 0, "eval_every": 0,
                  "log_every": 1, "progress": False, **train},
        "objective": {"method": method, "target": 0.5, "hidden_cosine": 0.1, "lambda_cost": 5.0,
                      "curriculum": {"steps": steps}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(cmd: list[str], *, extra_env: dict | None = None, expect: int = 0, timeout: int = TIMEOUT) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if expect is not None:
        assert proc.returncode == expect, f"{' '.join(cmd)} -> {proc.returncode}\n{out[-4000:]}"
    return out


def single(recipe: Path, *overrides: str, **kw) -> str:
    return run([sys.executable, "-m", "trim.train", str(recipe), *overrides], **kw)


def torchrun(recipe: Path, *overrides: str, nproc: int = 2, **kw) -> str:
    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "trim.train", str(recipe), *overrides], **kw)


def metrics(tmp: Path, name: str, kind: str = "train") -> list[dict]:
    lines = (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["kind"] == kind]


def assert_same_curve(a: list[dict], b: list[dict], rtol: float, key: str = "loss") -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert y[key] == pytest.approx(x[key], rel=rtol), f"step {x['step']}: {x[key]} vs {y[key]}"


@pytest.fixture(scope="module")
def one_process(shapes, tmp_path_factory):
    """The reference: plain fine-tuning, 1 process, global batch 8, eval at step 3 and 6."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(tmp, shapes, "one", method="none", batch=8, eval_every=3)
    single(recipe)
    return tmp, metrics(tmp, "one"), metrics(tmp, "one", "eval")


def test_ddp_two_processes_match_one_process(shapes, tmp_path, one_process):
    _, ref, ref_eval = one_process
    recipe = write_recipe(tmp_path, shapes, "two", method="none", batch=4, eval_every=3)
    torchrun(recipe, nproc=2)
    got = metrics(tmp_path, "two")
    assert [m["samples"] for m in got] == [m["samples"] for m in ref] == [8 * s for s in range(1, 7)]
    assert_same_curve(ref, got, rtol=1e-4)
    assert_same_curve(ref_eval, metrics(tmp_path, "two", "eval"), rtol=1e-4, key="accuracy")
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6


def test_two_nodes_on_loopback(shapes, tmp_path, one_process):
    """Two torchrun invocations, --nnodes 2, c10d rendezvous on 127.0.0.1: one process per 'node'."""
    _, ref, _ = one_process
    recipe = write_recipe(tmp_path, shapes, "nodes", method="none", batch=4, eval_every=3)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=trim-two-nodes", "--max_restarts=0",
           "-m", "trim.train", str(recipe)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outs = [n.communicate(timeout=TIMEOUT)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, out in zip(nodes, outs):
        assert n.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "runs" / "nodes" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert_same_curve(ref, metrics(tmp_path, "nodes"), rtol=1e-4)


def test_srun_style_tasks(shapes, tmp_path, one_process):
    """Two plain processes carrying only srun's SLURM_* variables (what `srun python -m trim.train`
    gives each task) form one DDP job: trim maps them to RANK / WORLD_SIZE / LOCAL_RANK."""
    _, ref, _ = one_process
    recipe = write_recipe(tmp_path, shapes, "srun", method="none", batch=4, steps=3)
    port = free_port()
    tasks = []
    for rank in range(2):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                 "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        tasks.append(subprocess.Popen([sys.executable, "-m", "trim.train", str(recipe)], cwd=ROOT,
                                      env={**env(), **slurm}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [t.communicate(timeout=TIMEOUT)[0] for t in tasks]
    finally:
        for t in tasks:
            if t.poll() is None:
                t.kill()
    for t, out in zip(tasks, outs):
        assert t.returncode == 0, out[-4000:]
    assert json.loads((tmp_path / "runs" / "srun" / "summary.json").read_text())["processes"] == 2
    # the schedule differs (3 steps instead of 6), so compare the first step only: same weights, same batch
    assert metrics(tmp_path, "srun")[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-4)


def test_accelerate_and_deepspeed_launchers(shapes, tmp_path, one_process):
    """`accelerate launch` (launch/accelerate/cpu.yaml) and the `deepspeed` launcher (which passes
    --local_rank) each start a 2-process job that trains the same first step as one process."""
    _, ref, _ = one_process
    recipe = write_recipe(tmp_path, shapes, "launchers", method="none", batch=4, steps=2)
    bin_dir = Path(sys.executable).parent
    run([str(bin_dir / "accelerate"), "launch", "--config_file", "launch/accelerate/cpu.yaml",
         "--main_process_port", str(free_port()), "-m", "trim.train", str(recipe), "name=acc"])
    run([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "trim.train",
         str(recipe), "name=ds", "train.deepspeed=launch/deepspeed/zero2.json"])
    for name in ("acc", "ds"):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 2
        assert metrics(tmp_path, name)[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-4)


def test_deepspeed_zero2_trains_and_resumes(shapes, tmp_path):
    """ZeRO-2 over 2 gloo processes: a run killed after step 5 resumes from step_4 and ends where
    the uninterrupted ZeRO-2 run ends."""
    ds = "train.deepspeed=launch/deepspeed/zero2.json"
    recipe = write_recipe(tmp_path, shapes, "ds", batch=4, steps=6, save_every=4)
    torchrun(recipe, ds, "name=ds_ref")
    torchrun(recipe, ds, extra_env={"TRIM_FAULT": "step:5"}, expect=None)  # SIGKILL after step 5
    run_dir = tmp_path / "runs" / "ds"
    assert (run_dir / "latest").read_text().strip() == "step_4"
    assert sorted(p.name for p in (run_dir / "step_4" / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    out = torchrun(recipe, ds, "train.resume=latest")
    assert "resumed from" in out and "at step 4" in out
    ref, got = metrics(tmp_path, "ds_ref"), metrics(tmp_path, "ds")
    assert_same_curve(ref, got, rtol=1e-5)
    assert_same_curve(ref, got, rtol=1e-9, key="target")
    from trim.models import load_model

    assert load_model(run_dir / "step_6").config.trim.cross_head_layers == [0, 1]


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(shapes, tmp_path):
    """Kill -9 from outside while training, and kill -9 while a checkpoint is being written:
    both resume from the last complete checkpoint with the same data, RNG, optimizer and
    curriculum target, reproducing the uninterrupted run."""
    recipe = write_recipe(tmp_path, shapes, "crash", batch=4, steps=12, save_every=4)
    single(recipe, "name=ref")
    ref = metrics(tmp_path, "ref")
    assert ref[7]["target"] < ref[3]["target"] < 1.0  # the curriculum is still moving at the checkpoints

    # 1. External SIGKILL once step_4 is complete and training has gone on past it.
    run_dir = tmp_path / "runs" / "crash"
    proc = subprocess.Popen([sys.executable, "-m", "trim.train", str(recipe), "train.steps=12"], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "latest").is_file() and any(m["step"] >= 5 for m in _maybe_metrics(run_dir)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = (run_dir / "latest").read_text().strip()
    resumed_at = int(last.split("_")[1])
    assert resumed_at in (4, 8)
    out = single(recipe, "train.resume=latest", "train.steps=12")
    assert f"at step {resumed_at}" in out
    got = metrics(tmp_path, "crash")
    assert_same_curve(ref, got, rtol=1e-5)
    assert_same_curve(ref, got, rtol=1e-9, key="target")

    # 2. SIGKILL inside the checkpoint write of step 8 (weights written, directory not renamed).
    recipe2 = write_recipe(tmp_path, shapes, "crash2", batch=4, steps=12, save_every=4)
    single(recipe2, extra_env={"TRIM_FAULT": "save:8"}, expect=-signal.SIGKILL)
    run2 = tmp_path / "runs" / "crash2"
    assert (run2 / "latest").read_text().strip() == "step_4"
    assert (run2 / "step_8.tmp" / "model.safetensors").is_file() and not (run2 / "step_8").exists()
    out = single(recipe2, "train.resume=latest")
    assert "at step 4" in out
    assert not (run2 / "step_8.tmp").exists() and (run2 / "latest").read_text().strip() == "step_12"
    got = metrics(tmp_path, "crash2")
    assert_same_curve(ref, got, rtol=1e-5)
    assert [m["target"] for m in got][4] == pytest.approx(ref[4]["target"])  # step 5: the first after the resume


def _maybe_metrics(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _global_mean_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from trim.train.distributed import global_mean

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    w = torch.tensor([0.3, -0.2], requires_grad=True)
    x = torch.arange(8.0).reshape(4, 2)[rank * 2:(rank + 1) * 2]  # this rank's half of the batch
    ratio = global_mean(world)(torch.sigmoid(x @ w).mean())
    ((ratio - 0.5) ** 2).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    queue.put((rank, (grad / world).tolist(), float(ratio)))  # what DDP's averaged gradient would be
    dist.destroy_process_group()


def test_cost_term_uses_the_global_batch_mean():
    """lambda * (mean over the global batch - target)^2 under 2 processes with DDP-style gradient
    averaging gives exactly the 1-process gradient."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_global_mean_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join(60)
    w = torch.tensor([0.3, -0.2], requires_grad=True)
    ratio = torch.sigmoid(torch.arange(8.0).reshape(4, 2) @ w).mean()
    ((ratio - 0.5) ** 2).backward()
    for _, grad, r in results:
        assert r == pytest.approx(float(ratio.detach()), rel=1e-6)
        torch.testing.assert_close(torch.tensor(grad), w.grad, rtol=1e-6, atol=1e-8)
