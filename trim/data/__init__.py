"""Data: the embedded synthetic world, webdataset streaming, converters from official formats.

The API other packages use (documented in docs/data.md):

- ``build_loader(urls, task, ...)``: batches of ``vqa`` / ``nlvr2`` / ``seg`` from shards
- ``load_tokenizer(path_or_dir)``: the ``tokenizer.json`` written beside the shards
- ``read_manifest(root)``, ``split_urls(root, task, split)``: the shard directory's manifest
- ``write_synthetic(out, {"train": n, ...})``: the synthetic world as shards
"""

from trim.data.answers import normalize_answer, soft_score
from trim.data.make_synthetic import write_synthetic
from trim.data.shards import read_manifest, split_samples, split_urls
from trim.data.stream import ShardLoader, SkipStats, build_loader, expand_urls
from trim.data.tokenizer import load_tokenizer

__all__ = [
    "ShardLoader",
    "SkipStats",
    "build_loader",
    "expand_urls",
    "load_tokenizer",
    "normalize_answer",
    "read_manifest",
    "soft_score",
    "split_samples",
    "split_urls",
    "write_synthetic",
]
