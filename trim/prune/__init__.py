"""The pruning methods' parts, independent of data and trainer."""

from trim.prune.cost import CostMeter, block_flops
from trim.prune.curriculum import Curriculum
from trim.prune.distill import feature_distillation
from trim.prune.gumbel import TemperatureSchedule, gumbel_sigmoid
from trim.prune.policies import POLICIES, RATIO_POLICIES, head_trimmer, token_trimmer
from trim.prune.routing import BigLittleRouter, little_from_big
from trim.prune.stack import LAYOUTS, TRIM_MODES, LayerRecord, TrimmedStack, auto_layout, start_tokens
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, Trimmer, heads_to_run, trimmer_modules
from trim.prune.windowed import WindowTokenTrimmer

__all__ = ["LAYOUTS", "POLICIES", "RATIO_POLICIES", "BigLittleRouter", "CostMeter", "Curriculum", "HeadTrimmer",
           "LayerRecord", "TRIM_MODES", "TemperatureSchedule", "TokenTrimmer", "TrimmedStack", "Trimmer",
           "WindowTokenTrimmer", "auto_layout", "block_flops", "feature_distillation", "gumbel_sigmoid",
           "head_trimmer", "heads_to_run", "little_from_big", "start_tokens", "token_trimmer", "trimmer_modules"]
