"""Data throughput: time to write synthetic VQA shards, and loader samples/s at 64px and 384px.

    .venv/bin/python benchmarks/data_throughput.py [--samples 10000] [--samples-384 2000] [--workers 2]

The loader is measured in eval mode (one exact pass: decode, resize, normalise, tokenise,
collate in the workers). "steady" excludes the time to the first batch (worker start-up
and the first shard open); "end to end" includes it. The machine's load average is
printed too: on a shared machine it explains most of the spread between runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from trim.data import build_loader, load_tokenizer, split_urls, write_synthetic


def write(root: Path, samples: int, image_size: int) -> float:
    start = time.perf_counter()
    write_synthetic(root, {"train": samples}, tasks=["vqa"], image_size=image_size, image_format="jpg", progress=False)
    return time.perf_counter() - start


def read(root: Path, image_size: int, workers: int, batch_size: int) -> tuple[int, float, float]:
    loader = build_loader(split_urls(root, "vqa", "train"), "vqa", tokenizer=load_tokenizer(root), batch_size=batch_size,
                          mode="eval", image_size=image_size, num_workers=workers)  # fmt: skip
    start = time.perf_counter()
    first = None
    n = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        n += batch["pixel_values"].shape[0]
    end = time.perf_counter()
    assert loader.stats.samples == n and not loader.stats.total_skipped, loader.stats.summary()
    return n, end - start, end - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000, help="VQA samples at 64px (written and read)")
    parser.add_argument("--samples-384", type=int, default=2_000, help="VQA samples at 384px (written and read)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start; torch {torch.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for size, samples in ((64, args.samples), (384, args.samples_384)):
            root = Path(tmp) / f"vqa{size}"
            seconds = write(root, samples, size)
            megabytes = sum(p.stat().st_size for p in (root / "vqa").glob("*.tar")) / 1e6
            print(f"write {samples} synthetic VQA samples at {size}px JPEG: {seconds:.1f} s "
                  f"({samples / seconds:.0f} samples/s, {megabytes:.0f} MB of shards, 1 process)")  # fmt: skip
            n, total, steady = read(root, size, args.workers, args.batch_size)
            rows.append((size, n, total, steady))
        print(f"\nloader, task vqa, mode eval, {args.workers} workers, batch {args.batch_size}:")
        print(f"{'image':>7} {'samples':>8} {'end to end':>16} {'steady':>16}")
        for size, n, total, steady in rows:
            print(f"{size:>5}px {n:>8} {n / total:>10.0f} smp/s {n / steady:>10.0f} smp/s")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
