"""The text tokenizer saved beside the shards as ``tokenizer.json``.

A BERT-style WordPiece tokenizer (lower-casing, punctuation split, ``[CLS] a [SEP]``),
built with the ``tokenizers`` library and loaded with ``transformers``. Its vocabulary
is chosen here rather than by ``WordPieceTrainer`` because the trainer breaks ties in
an order that changes between runs, and the same data must give byte-identical files:
whole words by frequency, then every character seen (alone and as a ``##`` piece), so
any word made of known characters still tokenises without ``[UNK]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from trim.errors import DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
TOKENIZER_FILE = "tokenizer.json"


def _pipeline_parts() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 30_000, min_frequency: int = 1) -> Tokenizer:
    """A WordPiece tokenizer whose vocabulary covers the most frequent words of ``texts``."""
    normalizer, pre_tokenizer = _pipeline_parts()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    pieces = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    budget = max(0, vocab_size - len(pieces))
    frequent = sorted((w for w, n in words.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-words[w], w))
    vocab = {token: i for i, token in enumerate([*pieces, *frequent[:budget]])}

    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(path_or_dir: str | Path, *, model_max_length: int = 512):
    """``PreTrainedTokenizerFast`` from a ``tokenizer.json`` (or the directory holding one).

    The special tokens are set so ``padding=True`` and masking work out of the box.
    """
    from transformers import PreTrainedTokenizerFast  # heavy import: only when asked

    path = Path(path_or_dir)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(
            f"no tokenizer at {path}; pass the shard directory written by `trim data synth` or a converter "
            f"(it holds {TOKENIZER_FILE}), or the path of a tokenizer.json"
        )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_max_length=model_max_length,
    )
