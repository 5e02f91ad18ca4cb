"""What every converter shares: the summary of what was written and skipped, file lookups."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from trim.data.tokenizer import TOKENIZER_FILE, build_tokenizer, save_tokenizer
from trim.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_EXAMPLES = 5


class Summary:
    """Samples written and skipped (by reason, with the first few names) by one conversion."""

    def __init__(self, name: str):
        self.name = name
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        lines = [f"{self.name}: {self.written} samples written, {self.total_skipped} skipped"]
        for reason, n in sorted(self.skipped.items()):
            more = ", ..." if n > len(self.examples[reason]) else ""
            lines.append(f"  {n} {reason} (first: {', '.join(self.examples[reason])}{more})")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def load_json(path: str | Path, *, what: str, required: tuple[str, ...] = ()) -> Any:
    """Parse a JSON file, with an error naming the file and the missing keys of its schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise DataError(f"{what} file {path} is not valid JSON: {exn}") from exn
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} is not a {what} file in the official schema: no {missing} (it has {have})")
    return data


def index_images(folder: str | Path) -> dict[str, Path]:
    """File name -> path of every image under ``folder`` (recursive: NLVR2 train uses subfolders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    found: dict[str, Path] = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.setdefault(name, Path(directory) / name)
    return found


def image_extension(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def read_checked_image(path: Path) -> bytes | None:
    """The file's bytes if its header is an image PIL can open (cheap: no full decode)."""
    data = path.read_bytes()
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception:  # PIL raises many types for a bad file; all mean "not an image"
        return None
    return data


def ensure_tokenizer(out: Path, texts: list[str], tokenizer: str | Path | None) -> None:
    """Copy ``tokenizer`` into ``out``, or build one from ``texts`` if ``out`` has none yet.

    Splits are converted one call at a time; the first call's text decides the vocabulary
    so later splits share the same token ids.
    """
    target = out / TOKENIZER_FILE
    if tokenizer is not None:
        source = Path(tokenizer)
        source = source / TOKENIZER_FILE if source.is_dir() else source
        if not source.is_file():
            raise DataError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        target.write_bytes(source.read_bytes())
    elif not target.is_file():
        save_tokenizer(build_tokenizer(texts), out)


_DIGITS = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def trailing_number(name: str) -> int | None:
    """COCO image id from a file name (``COCO_val2014_000000000042.jpg`` or ``000000000042.jpg``)."""
    match = _DIGITS.search(name)
    return int(match.group(1)) if match else None
