"""`trim bench CHECKPOINT | RECIPE.yaml | meter`: wall-clock full vs trimmed for a whole model.

Both sides run the same weights on the same inputs in one process: trim="off" (untrimmed)
against trim="eval" in each layout (``packed``: a batch pays for what each sample kept;
``padded``: every sample padded to the batch's longest, heads run as the batch's union),
interleaved, after warm-up, median of repeats (design invariant 5).

Decisions differ per sample, as a trained model's do. Without ``--targets`` the checkpoint's
own learned decisions are timed. With ``--targets`` every token trimmer keeps a forced
fraction and every head trimmer a forced share of its heads, drawn per sample: sample b keeps
``mean + u_b`` with the u_b spread evenly over ``[-spread, +spread]`` (``--spread``, default
0.25; 0 gives the uniform ratio a trained model never has), and ``mean`` is solved so the
mean per-sample cost ratio is the target. Reported per row: the per-sample mean cost ratio
(what the samples kept), the cost ratio of what ran (padding and head unions included),
the measured speedup, and efficiency = speedup x per-sample cost (1.0: every FLOP saved
per sample became time saved).

``meter`` is the METER-size preset: CLIP-ViT-B/16 at 288 px, RoBERTa-base text, six
768-wide co-attention layers, random weights; token trimmers after vision layers 1, 3, 5, 7
(conditioned on the text) and in cross layers 0, 2, 4 (both streams), head trimmers on the
same vision layers and cross layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from trim.eval.speed import median, time_interleaved
from trim.models import ModelConfig, TextConfig, TrimConfig, TrimModel, VisionConfig, create_model, load_model
from trim.prune import LAYOUTS, HeadTrimmer, TokenTrimmer

def meter_config(image_size: int = 288) -> ModelConfig:
    return ModelConfig(
        family="dual", task="vqa", num_labels=3129,
        vision=VisionConfig(image_size=image_size, patch_size=16, width=768, layers=12, heads=12, act="quick_gelu",
                            eps=1e-5, patch_bias=False, ln_pre=True, ln_post=True),
        text=TextConfig(vocab_size=50265, max_positions=514, type_vocab_size=1, width=768, layers=12, heads=12,
                        eps=1e-5, pad_token_id=1, roberta_positions=True),
        cross_layers=6, cross_width=768, cross_heads=12,
        trim=TrimConfig(vision_token_layers=[1, 3, 5, 7], vision_head_layers=[1, 3, 5, 7],
                        cross_token_layers=[0, 2, 4], cross_head_layers=[0, 2, 4]))


def model_inputs(cfg: ModelConfig, batch: int, text_len: int = 40, seed: int = 0,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    shape = (batch, 2, 3, size, size) if cfg.task == "nlvr2" else (batch, 3, size, size)
    text_len = min(text_len, cfg.text.max_positions - 2)
    ids = torch.randint(5, cfg.text.vocab_size, (batch, text_len), generator=g)
    return {"pixel_values": torch.randn(shape, generator=g).to(device), "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def spread_keeps(mean: float, batch: int, spread: float, seed: int = 0) -> torch.Tensor:
    """(B,) per-sample keep fractions: ``mean`` plus offsets spread evenly over ±``spread``, shuffled."""
    offsets = torch.linspace(-spread, spread, batch) if batch > 1 else torch.zeros(1)
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return (mean + offsets[order]).clamp(0.02, 1.0)


def set_forced(model: TrimModel, keeps: torch.Tensor | None) -> None:
    """Force every token trimmer to keep ``keeps`` (B,) of its prunable tokens and every head
    trimmer the same share of its heads; None restores the learned decisions."""
    for m in model.modules():
        if isinstance(m, TokenTrimmer):
            m.forced_ratio = keeps
        elif isinstance(m, HeadTrimmer):
            m.forced_heads = None if keeps is None else (keeps * m.num_heads).round().long().clamp_min(1)


def has_trimmers(model: TrimModel) -> bool:
    return any(isinstance(m, (TokenTrimmer, HeadTrimmer)) for m in model.modules())


def per_sample_cost(model: TrimModel, inputs: dict, keeps: torch.Tensor | None) -> torch.Tensor:
    set_forced(model, keeps)
    with torch.inference_mode():
        return model(inputs, trim="masked").cost_ratio.float().cpu()


def solve_mean_keep(model: TrimModel, probe: dict, target: float, batch: int, spread: float) -> float:
    """The mean keep whose spread over ``batch`` samples costs ``target`` on average.

    A sample's cost depends on its keep fraction only (forced decisions keep a count, and every
    sample has the same number of tokens), so the cost curve c(keep) is tabulated once on one
    sample and the mean solved on it, instead of running the whole batch per bisection step.
    """
    grid = np.linspace(0.02, 1.0, 15)
    curve = np.array([float(per_sample_cost(model, probe, torch.tensor([k]))[0]) for k in grid])
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        cost = np.interp(spread_keeps(mid, batch, spread).numpy(), grid, curve).mean()
        lo, hi = (mid, hi) if cost < target else (lo, mid)
    return (lo + hi) / 2


def run(model: TrimModel, *, batch_sizes: list[int], targets: list[float] | None, warmup: int, repeats: int,
        spread: float = 0.25, layouts: tuple[str, ...] = ("packed", "padded"), text_len: int = 40,
        device: str = "cpu") -> list[dict]:
    if not has_trimmers(model):
        raise ValueError("this model has no trimmers to time; set model.trim.*_layers")
    model = model.to(device).eval()
    rows = []
    for bs in batch_sizes:
        inputs = model_inputs(model.config, bs, text_len, device=device)
        probe = {k: v[:1] for k, v in inputs.items()}
        settings = {"learned": None}
        if targets:
            settings = {t: spread_keeps(solve_mean_keep(model, probe, t, bs, spread), bs, spread).to(device)
                        for t in targets}
        candidates = {"full": lambda: model(inputs, trim="off")}
        for t, keeps in settings.items():
            for layout in layouts:
                candidates[f"{t}/{layout}"] = _trimmed(model, inputs, keeps, layout)
        times = time_interleaved(candidates, warmup=warmup, repeats=repeats, device=torch.device(device))
        full = median(times["full"])
        for t, keeps in settings.items():
            sample_cost = per_sample_cost(model, inputs, keeps)
            for layout in layouts:
                set_forced(model, keeps)
                with torch.inference_mode():
                    ran = float(model(inputs, trim="eval", layout=layout).cost_ratio.float().mean())
                trimmed = median(times[f"{t}/{layout}"])
                rows.append({"batch": bs, "target": t, "layout": layout, "cost_ratio": float(sample_cost.mean()),
                             "cost_spread": float(sample_cost.std()) if bs > 1 else 0.0, "cost_ran": ran,
                             "full_ms": 1e3 * full, "trimmed_ms": 1e3 * trimmed, "speedup": full / trimmed,
                             "efficiency": full / trimmed * float(sample_cost.mean())})
    set_forced(model, None)
    return rows


def _trimmed(model: TrimModel, inputs: dict, keeps: torch.Tensor | None, layout: str):
    def fn():
        set_forced(model, keeps)
        return model(inputs, trim="eval", layout=layout)
    return fn


def format_table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'target':>7} {'layout':>7} {'cost/sample':>11} {'(std)':>6} {'cost ran':>9} "
            f"{'full ms':>9} {'trim ms':>9} {'speedup':>8} {'efficiency':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>5} {str(r['target']):>7} {r['layout']:>7} {r['cost_ratio']:>11.3f} "
                     f"{r['cost_spread']:>6.3f} {r['cost_ran']:>9.3f} {r['full_ms']:>9.1f} {r['trimmed_ms']:>9.1f} "
                     f"{r['speedup']:>8.2f} {r['efficiency']:>11.2f}")
    return "\n".join(lines)


def load_source(source: str, image_size: int | None = None) -> TrimModel:
    if source == "meter":
        torch.manual_seed(0)
        return create_model(meter_config(image_size or 288))
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        from trim.config import load_recipe

        return create_model(load_recipe(path).model.config)
    return load_model(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim bench", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory, recipe YAML, or 'meter' (METER-size preset)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--targets", type=float, nargs="*", default=None,
                   help="force trimmers to these mean cost ratios (default: 0.5 0.33 for meter, learned otherwise)")
    p.add_argument("--spread", type=float, default=0.25,
                   help="with --targets: per-sample keep fractions spread evenly over mean ± this")
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"], choices=LAYOUTS,
                   help="auto: what the model picks by its size (trim.prune.auto_layout)")
    p.add_argument("--image-size", type=int, default=None, help="meter only: image size (default 288)")
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    targets = a.targets if a.targets is not None else ([0.5, 0.33] if a.source == "meter" else None)
    model = load_source(a.source, image_size=a.image_size)
    rows = run(model, batch_sizes=a.batch_sizes, targets=targets, warmup=a.warmup, repeats=a.repeats,
               spread=a.spread, layouts=tuple(a.layouts), text_len=a.text_len, device=a.device)
    cfg = model.config
    decisions = (f"forced per sample, keep = mean ± {a.spread} (even spread)" if targets else "learned")
    print(f"{a.source}: {cfg.family} {cfg.task}, image {cfg.vision.image_size}px, text {a.text_len} tokens, "
          f"decisions {decisions}, device {a.device}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats} after {a.warmup} warm-up")
    print(format_table(rows))
    return 0
