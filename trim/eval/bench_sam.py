"""`trim bench sam`: does the FLOPs window-wise trimming and big.LITTLE save become wall-clock time?

One SAM image encoder with random weights (``--preset vit-b``: SAM-ViT-B, 1024 px, width 768,
depth 12, 12 heads, 14x14 windows, global blocks 2, 5, 8, 11; ``--preset tiny`` for tests) runs
three ways on the same weights and images, interleaved, after warm-up, median of repeats
(design invariant 5):

* ``full``: the encoder as SAM runs it (trim="off");
* ``window-trim``: window-wise token trimmers before blocks 1, 3, 6 and 9, each keeping the same
  forced share of every window's alive tokens, the share solved so the analytic cost ratio is
  ``--target``;
* ``big.LITTLE``: every block after the first routed (P-block on the top share of each window's
  tokens, the image's in global blocks; quarter-width E-block on all), the share solved likewise.

Reported per variant: the analytic cost ratio (trimmers, predictors and E-blocks included),
the measured speedup over ``full`` and efficiency = speedup x cost ratio (1.0: every FLOP saved
became time saved; the goal is 0.85).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from trim.eval.speed import median, time_interleaved
from trim.models.config import SamEncoderConfig, SamTrimConfig
from trim.models.sam import SamImageEncoder

PRESETS = {
    "vit-b": SamEncoderConfig(image_size=1024, patch_size=16, width=768, depth=12, heads=12, window_size=14,
                              global_attn_indexes=[2, 5, 8, 11], out_chans=256),
    "tiny": SamEncoderConfig(image_size=64, patch_size=4, width=64, depth=4, heads=4, window_size=5,
                             global_attn_indexes=[1, 3], out_chans=32),
}


def bench_encoders(cfg: SamEncoderConfig) -> dict[str, SamImageEncoder]:
    """The full, window-trimmed and big.LITTLE encoders, sharing the full encoder's weights."""
    late = [i for i in (1, 3, 6, 9) if i < cfg.depth]
    full = SamImageEncoder(cfg, SamTrimConfig(token_layers=late)).eval()
    routed = SamImageEncoder(cfg, SamTrimConfig(route_layers=list(range(1, cfg.depth)))).eval()
    shared = {k: v for k, v in full.state_dict().items() if not k.startswith("token_trimmers.")}
    routed.load_state_dict(shared, strict=False)
    routed.init_little_from_big()  # E-blocks from the shared P-blocks
    return {"window-trim": full, "big.LITTLE": routed}


def _set_share(encoder: SamImageEncoder, share: float) -> None:
    for module in [*encoder.token_trimmers.values(), *encoder.routers.values()]:
        module.forced_ratio = share


def cost_at(encoder: SamImageEncoder, image: torch.Tensor, share: float) -> float:
    _set_share(encoder, share)
    with torch.inference_mode():
        return float(encoder(image, trim="eval").cost_ratio[0])


def solve_share(encoder: SamImageEncoder, image: torch.Tensor, target: float, steps: int = 10) -> float:
    """Bisect the forced share whose cost ratio is ``target`` (cost grows with the share)."""
    lo, hi = 0.01, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_at(encoder, image, mid) < target else (lo, mid)
    return (lo + hi) / 2


def run(cfg: SamEncoderConfig, *, target: float = 0.5, batch: int = 1, warmup: int = 2, repeats: int = 5,
        device: str = "cpu", seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    dev = torch.device(device)
    encoders = {name: enc.to(dev) for name, enc in bench_encoders(cfg).items()}
    image = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev)
    shares = {name: solve_share(enc, image[:1], target) for name, enc in encoders.items()}
    reference = encoders["window-trim"]

    def call(encoder: SamImageEncoder, mode: str, share: float | None = None) -> Callable[[], object]:
        def fn():
            if share is not None:
                _set_share(encoder, share)
            with torch.inference_mode():
                return encoder(image, trim=mode)
        return fn

    candidates = {"full": call(reference, "off")}
    candidates |= {name: call(enc, "eval", shares[name]) for name, enc in encoders.items()}
    times = time_interleaved(candidates, warmup=warmup, repeats=repeats, device=dev)
    full = median(times["full"])
    rows = [{"variant": "full", "share": 1.0, "cost_ratio": 1.0, "ms": 1e3 * full, "speedup": 1.0, "efficiency": 1.0}]
    for name, enc in encoders.items():
        cost = cost_at(enc, image[:1], shares[name])
        speedup = full / median(times[name])
        rows.append({"variant": name, "share": shares[name], "cost_ratio": cost, "ms": 1e3 * median(times[name]),
                     "speedup": speedup, "efficiency": speedup * cost})
    for enc in encoders.values():
        _set_share(enc, None)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':>12} {'share':>6} {'cost ratio':>10} {'ms':>9} {'speedup':>8} {'efficiency':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:>12} {r['share']:>6.3f} {r['cost_ratio']:>10.3f} {r['ms']:>9.1f} "
                     f"{r['speedup']:>8.2f} {r['efficiency']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim bench sam", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit-b")
    p.add_argument("--target", type=float, default=0.5, help="cost ratio both pruned variants are solved for")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    cfg = PRESETS[a.preset]
    rows = run(cfg, target=a.target, batch=a.batch, warmup=a.warmup, repeats=a.repeats, device=a.device)
    print(f"sam {a.preset}: {cfg.image_size}px, width {cfg.width}, depth {cfg.depth}, {cfg.heads} heads, window "
          f"{cfg.window_size}, global blocks {cfg.global_attn_indexes}, random weights, batch {a.batch}, device "
          f"{a.device}, {torch.get_num_threads()} threads, median of {a.repeats} after {a.warmup} warm-up; "
          f"efficiency = speedup x cost ratio (goal >= 0.85)")
    print(format_table(rows))
    return 0
