"""Converters from the official dataset formats to trim's shard layout (see trim.data.shards).

``data_tools/*.py`` and ``trim data vqa2|nlvr2|sa1b|coco`` are thin wrappers around these.
"""

from trim.data.convert.common import Summary
from trim.data.convert.nlvr2 import convert_nlvr2
from trim.data.convert.sa1b import convert_coco, convert_sa1b
from trim.data.convert.vqa2 import convert_vqa2

__all__ = ["Summary", "convert_coco", "convert_nlvr2", "convert_sa1b", "convert_vqa2"]
