"""`trim bench core`: does the FLOPs a trimmer saves become wall-clock time?

A ViT-B-sized pre-norm stack (12 layers, width 768, 12 heads, 577 tokens = 24x24 patches at
384 px + CLS) with token trimmers after layers 3, 6 and 9, each forced to keep the same
fraction r of the tokens still alive. r is solved so the analytic cost ratio (trimmer
overhead included) hits each target. The table reports, per batch size, the analytic ratio,
the measured speedup of the physical (gathered) forward over the untrimmed one, and the
efficiency speedup / (1 / ratio): 1.0 means every FLOP saved became time saved.
"""

from __future__ import annotations

import argparse

import torch

from trim.eval.speed import median, time_interleaved
from trim.nn import PreNormBlock
from trim.prune import CostMeter, TokenTrimmer, TrimmedStack, start_tokens


def build_stack(layers: int, dim: int, heads: int, prune_at: list[int]) -> TrimmedStack:
    blocks = [PreNormBlock(dim, heads) for _ in range(layers)]
    return TrimmedStack(blocks, token_trimmers={i: TokenTrimmer(dim) for i in prune_at}).eval()


def analytic_ratio(stack: TrimmedStack, x: torch.Tensor, protect: torch.Tensor) -> float:
    meter = CostMeter()
    with torch.inference_mode():
        stack(start_tokens(x, "eval", protect=protect), mode="eval", meter=meter)
    return float(meter.ratio().mean())


def set_keep(stack: TrimmedStack, keep: float) -> None:
    for trimmer in stack.token_trimmers.values():
        trimmer.forced_ratio = keep


def solve_keep(stack: TrimmedStack, x: torch.Tensor, protect: torch.Tensor, target: float) -> float:
    """Bisect the per-trimmer keep fraction whose analytic cost ratio equals ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        set_keep(stack, mid)
        lo, hi = (mid, hi) if analytic_ratio(stack, x[:1], protect[:1]) < target else (lo, mid)
    return (lo + hi) / 2


def run(*, batch_sizes: list[int], targets: list[float], layers: int = 12, dim: int = 768, heads: int = 12,
        tokens: int = 577, prune_at: list[int] | None = None, warmup: int = 2, repeats: int = 5,
        device: str = "cpu") -> list[dict]:
    dev = torch.device(device)
    torch.manual_seed(0)
    stack = build_stack(layers, dim, heads, prune_at or [3, 6, 9]).to(dev)
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, tokens, dim, device=dev)
        protect = torch.zeros(bs, tokens, dtype=torch.bool, device=dev)
        protect[:, 0] = True  # CLS
        settings = {t: solve_keep(stack, x, protect, t) for t in targets}

        def trimmed(keep: float):
            def fn():
                set_keep(stack, keep)
                return stack(start_tokens(x, "eval", protect=protect), mode="eval")
            return fn

        candidates = {"full": lambda: stack(start_tokens(x, "off", protect=protect), mode="off")}
        candidates |= {f"target {t}": trimmed(k) for t, k in settings.items()}
        times = time_interleaved(candidates, warmup=warmup, repeats=repeats, device=dev)
        full = median(times["full"])
        for t, keep in settings.items():
            set_keep(stack, keep)
            ratio = analytic_ratio(stack, x, protect)
            speedup = full / median(times[f"target {t}"])
            rows.append({"batch": bs, "keep_per_stage": keep, "cost_ratio": ratio, "full_ms": 1e3 * full,
                         "trimmed_ms": 1e3 * median(times[f"target {t}"]), "speedup": speedup,
                         "efficiency": speedup * ratio})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'batch':>5} {'keep/stage':>10} {'cost ratio':>10} {'full ms':>9} {'trim ms':>9} {'speedup':>8} {'speedup/(1/ratio)':>18}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['keep_per_stage']:>10.3f} {r['cost_ratio']:>10.3f} {r['full_ms']:>9.1f} "
                     f"{r['trimmed_ms']:>9.1f} {r['speedup']:>8.2f} {r['efficiency']:>18.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim bench core", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.33])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=577)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    rows = run(batch_sizes=a.batch_sizes, targets=a.targets, layers=a.layers, dim=a.dim, heads=a.heads,
               tokens=a.tokens, warmup=a.warmup, repeats=a.repeats, device=a.device)
    print(f"core: {a.layers} layers, width {a.dim}, {a.heads} heads, {a.tokens} tokens, pruned after layers 3/6/9, "
          f"device {a.device}, {torch.get_num_threads()} threads, median of {a.repeats} after {a.warmup} warm-up")
    print(format_table(rows))
    return 0
