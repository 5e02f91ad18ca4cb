"""Why batch-1 speedups trail the FLOP ratio on a CPU: a GEMM's throughput falls with its rows.

    python benchmarks/gemm_rows.py

Times the METER-size MLP projection (768 -> 3072) for as many rows as a layer keeps tokens.
Pruning a sample from ~200 to ~50 tokens cuts its FLOPs 4x but its time less, because the
weight matrix is read once per call whatever the row count: the fewer the rows, the more the
call is bound by that read. Batching (packed rows of many samples) restores the row count.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def main() -> None:
    weight = torch.randn(3072, 768)
    print(f"rows  ms/call  GFLOPS   ({torch.get_num_threads()} threads, median of 7 x 20 calls)")
    for rows in (1024, 240, 197, 120, 80, 60, 40, 20):
        x = torch.randn(rows, 768)
        for _ in range(5):
            F.linear(x, weight)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(20):
                F.linear(x, weight)
            times.append((time.perf_counter() - start) / 20)
        t = sorted(times)[3]
        print(f"{rows:>4}  {t * 1e3:7.3f}  {2 * rows * 768 * 3072 / t / 1e9:6.0f}")


if __name__ == "__main__":
    main()
