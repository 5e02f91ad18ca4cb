"""Names of the token streams a model records (``ModelOutput.records`` keys), defined once.

The dual-stream model records ``text`` and ``vision`` (its uni-modal towers) and
``cross_text`` / ``cross_image`` (its co-attention layers); ViLT records one stream, ``vilt``.
NLVR2 encodes two images per statement and suffixes each stream with ``/image<k>``.
The objective, the evaluator and the plots use these names; none parses record keys itself.
"""

from __future__ import annotations

TEXT, VISION, CROSS_TEXT, CROSS_IMAGE, VILT = "text", "vision", "cross_text", "cross_image", "vilt"
STREAMS = (TEXT, VISION, CROSS_TEXT, CROSS_IMAGE, VILT)
# Streams whose tokens end with the image's patch grid (kept-token overlays, relevance).
IMAGE_STREAMS = (VISION, VILT, CROSS_IMAGE)
# The model.trim keys that place (token, head) trimmers on each stream.
TRIM_KEYS = {
    VISION: ("vision_token_layers", "vision_head_layers"),
    VILT: ("vision_token_layers", "vision_head_layers"),
    TEXT: ("text_token_layers", "text_head_layers"),
    CROSS_TEXT: ("cross_token_layers", "cross_head_layers"),
    CROSS_IMAGE: ("cross_token_layers", "cross_head_layers"),
}
_IMAGE_SUFFIX = "/image"


def per_image(stream: str, image_index: int) -> str:
    """The record name of ``stream`` for the ``image_index``-th image of an NLVR2 pair."""
    return f"{stream}{_IMAGE_SUFFIX}{image_index}"


def split_record_name(name: str) -> tuple[str, int | None]:
    """``"vision/image1"`` -> ("vision", 1); ``"vision"`` -> ("vision", None)."""
    stream, sep, index = name.partition(_IMAGE_SUFFIX)
    if stream not in STREAMS or (sep and not index.isdigit()):
        raise ValueError(f"{name!r} is not a stream record name; streams: {', '.join(STREAMS)}")
    return stream, int(index) if sep else None
