"""The pruning methods' parts, independent of data and trainer."""

from trim.prune.cost import CostMeter, block_flops
from trim.prune.curriculum import Curriculum
from trim.prune.distill import feature_distillation
from trim.prune.gumbel import TemperatureSchedule, gumbel_sigmoid
from trim.prune.routing import BigLittleRouter, little_from_big
from trim.prune.stack import LAYOUTS, TRIM_MODES, LayerRecord, TrimmedStack, auto_layout, start_tokens
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, heads_to_run, trimmer_modules
from trim.prune.windowed import WindowTokenTrimmer

__all__ = ["LAYOUTS", "BigLittleRouter", "CostMeter", "Curriculum", "HeadTrimmer", "LayerRecord", "TRIM_MODES",
           "TemperatureSchedule", "TokenTrimmer", "TrimmedStack", "WindowTokenTrimmer", "auto_layout", "block_flops", "feature_distillation",
           "gumbel_sigmoid", "heads_to_run", "little_from_big", "start_tokens", "trimmer_modules"]
