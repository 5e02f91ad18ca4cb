"""`trim bench CHECKPOINT | RECIPE.yaml | meter`: wall-clock full vs trimmed for a whole model.

Both sides run the same weights on the same inputs in one process: trim="off" (untrimmed)
against trim="eval" (kept tokens gathered, kept heads sliced), interleaved, after warm-up,
median of repeats. With ``--targets`` the token trimmers are forced to keep a fraction
solved so the analytic cost ratio hits each target (what a trained model at that target
would cost); without, the checkpoint's own learned decisions are timed.

``meter`` is the METER-size preset: CLIP-ViT-B/16 at 288 px, RoBERTa-base text, six
768-wide co-attention layers, random weights; token trimmers after vision layers 1, 3, 5, 7
(conditioned on the text) and in cross layers 0, 2, 4 (both streams). Spreading the
trimmers lets a target be met with a moderate keep per stage (0.70 for 0.5, 0.50 for 0.33)
instead of starving the late layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trim.eval.speed import median, time_interleaved
from trim.models import ModelConfig, TextConfig, TrimConfig, TrimModel, VisionConfig, create_model, load_model
from trim.prune import TokenTrimmer


def meter_config(image_size: int = 288) -> ModelConfig:
    return ModelConfig(
        family="dual", task="vqa", num_labels=3129,
        vision=VisionConfig(image_size=image_size, patch_size=16, width=768, layers=12, heads=12, act="quick_gelu",
                            eps=1e-5, patch_bias=False, ln_pre=True, ln_post=True),
        text=TextConfig(vocab_size=50265, max_positions=514, type_vocab_size=1, width=768, layers=12, heads=12,
                        eps=1e-5, pad_token_id=1, roberta_positions=True),
        cross_layers=6, cross_width=768, cross_heads=12,
        trim=TrimConfig(vision_token_layers=[1, 3, 5, 7], cross_token_layers=[0, 2, 4]))


def model_inputs(cfg: ModelConfig, batch: int, text_len: int = 40, seed: int = 0,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    shape = (batch, 2, 3, size, size) if cfg.task == "nlvr2" else (batch, 3, size, size)
    text_len = min(text_len, cfg.text.max_positions - 2)
    ids = torch.randint(5, cfg.text.vocab_size, (batch, text_len), generator=g)
    return {"pixel_values": torch.randn(shape, generator=g).to(device), "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def token_trimmers(model: TrimModel) -> list[TokenTrimmer]:
    return [m for m in model.modules() if isinstance(m, TokenTrimmer)]


def set_forced(model: TrimModel, keep: float | None) -> None:
    for trimmer in token_trimmers(model):
        trimmer.forced_ratio = keep


def cost_ratio(model: TrimModel, inputs: dict) -> float:
    with torch.inference_mode():
        return float(model(inputs, trim="eval").cost_ratio.mean())


def solve_forced_keep(model: TrimModel, inputs: dict, target: float) -> float:
    """Bisect the keep fraction of every token trimmer so the cost ratio equals ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        set_forced(model, mid)
        lo, hi = (mid, hi) if cost_ratio(model, inputs) < target else (lo, mid)
    return (lo + hi) / 2


def run(model: TrimModel, *, batch_sizes: list[int], targets: list[float] | None, warmup: int, repeats: int,
        text_len: int = 40, device: str = "cpu") -> list[dict]:
    if targets and not token_trimmers(model):
        raise ValueError("--targets forces token trimmers, but this model has none; set model.trim.*_token_layers")
    model = model.to(device).eval()
    rows = []
    for bs in batch_sizes:
        inputs = model_inputs(model.config, bs, text_len, device=device)
        probe = {k: v[:1] for k, v in inputs.items()}
        settings = {t: solve_forced_keep(model, probe, t) for t in targets} if targets else {"learned": None}

        def trimmed(keep):
            def fn():
                set_forced(model, keep)
                return model(inputs, trim="eval")
            return fn

        candidates = {"full": lambda: model(inputs, trim="off")}
        candidates |= {f"t={t}": trimmed(k) for t, k in settings.items()}
        times = time_interleaved(candidates, warmup=warmup, repeats=repeats, device=torch.device(device))
        full = median(times["full"])
        for t, keep in settings.items():
            set_forced(model, keep)
            ratio = cost_ratio(model, inputs)
            speedup = full / median(times[f"t={t}"])
            rows.append({"batch": bs, "target": t, "keep": keep, "cost_ratio": ratio, "full_ms": 1e3 * full,
                         "trimmed_ms": 1e3 * median(times[f"t={t}"]), "speedup": speedup,
                         "efficiency": speedup * ratio})
    set_forced(model, None)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'target':>7} {'keep':>6} {'cost ratio':>10} {'full ms':>9} {'trim ms':>9} "
            f"{'speedup':>8} {'speedup x ratio':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:.3f}"
        lines.append(f"{r['batch']:>5} {str(r['target']):>7} {keep:>6} {r['cost_ratio']:>10.3f} {r['full_ms']:>9.1f} "
                     f"{r['trimmed_ms']:>9.1f} {r['speedup']:>8.2f} {r['efficiency']:>16.2f}")
    return "\n".join(lines)


def load_source(source: str) -> TrimModel:
    if source == "meter":
        torch.manual_seed(0)
        return create_model(meter_config())
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        from trim.config import load_recipe

        return create_model(load_recipe(path).model)
    return load_model(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim bench", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory, recipe YAML, or 'meter' (METER-size preset)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--targets", type=float, nargs="*", default=None,
                   help="force token trimmers to these cost ratios (default: 0.5 0.33 for meter, learned otherwise)")
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    targets = a.targets if a.targets is not None else ([0.5, 0.33] if a.source == "meter" else None)
    model = load_source(a.source)
    rows = run(model, batch_sizes=a.batch_sizes, targets=targets, warmup=a.warmup, repeats=a.repeats,
               text_len=a.text_len, device=a.device)
    cfg = model.config
    print(f"{a.source}: {cfg.family} {cfg.task}, image {cfg.vision.image_size}px, text {a.text_len} tokens, "
          f"device {a.device}, {torch.get_num_threads()} threads, median of {a.repeats} after {a.warmup} warm-up")
    print(format_table(rows))
    return 0
