"""The pruning methods' parts, independent of data and trainer."""

from trim.prune.cost import CostMeter, block_flops
from trim.prune.curriculum import Curriculum
from trim.prune.gumbel import TemperatureSchedule, gumbel_sigmoid
from trim.prune.stack import LAYOUTS, TRIM_MODES, LayerRecord, TrimmedStack, auto_layout, start_tokens
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, heads_to_run, trimmer_modules

__all__ = ["LAYOUTS", "CostMeter", "Curriculum", "HeadTrimmer", "LayerRecord", "TRIM_MODES", "TemperatureSchedule",
           "TokenTrimmer", "TrimmedStack", "auto_layout", "block_flops", "gumbel_sigmoid", "heads_to_run", "start_tokens",
           "trimmer_modules"]
