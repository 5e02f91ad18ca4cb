import os

import pytest
import torch

# Deterministic, single-threaded-enough CPU runs: tests compare numbers, not speed.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small synthetic VQA shard set (64 train, 24 val, 32 px) for training tests."""
    from trim.data import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(out, {"train": 64, "val": 24}, tasks=("vqa",), image_size=32, progress=False)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread: the box is small and shared, and more threads than free cores make
    OpenMP spin-wait (CLI tests that time speed use it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
