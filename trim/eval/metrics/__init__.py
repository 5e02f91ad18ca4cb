"""Task metrics with the official formulas: VQA v2, NLVR2, prompted segmentation.

See docs/metrics.md for the formulas, the input formats and the exported files.
"""

from trim.eval.metrics.nlvr2 import export_csv, nlvr2_metrics
from trim.eval.metrics.seg import PromptedSegEvaluator, decode_rle, evaluate_prompted, mask_iou, next_click
from trim.eval.metrics.vqa import export_evalai, normalize_answer, vqa_accuracy

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "export_evalai",
    "nlvr2_metrics",
    "export_csv",
    "next_click",
    "mask_iou",
    "decode_rle",
    "PromptedSegEvaluator",
    "evaluate_prompted",
]
