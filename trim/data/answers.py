"""VQA answers: the official normalisation, the answer vocabulary and the soft scores.

VQA v2 gives every question 10 free-text answers. Two answers count as the same when
they are equal after the normalisation the official evaluation applies (punctuation,
number words -> digits, articles dropped, common contractions restored). The answer
vocabulary is built the way ViLT and METER build theirs: the normalised
``multiple_choice_answer`` of every train+val question, kept when seen at least 9 times.
A question's target for class ``a`` is a soft score from how many of its 10 annotators
said ``a``::

    score(n) = 0, 0.3, 0.6, 0.9, 1.0   for n = 0, 1, 2, 3, >= 4

(the official accuracy, min(1, n/3), averaged over the 10 leave-one-out subsets of
annotators, rounded to these steps).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# Punctuation the official evaluation strips or turns into a space.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# Like the official evaluation: a period is dropped unless a digit follows ("2." -> "2", "2.5" stays).
_PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings annotators type, mapped back to the contraction.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "im": "i'm", "isnt": "isn't", "itll": "it'll", "ive": "i've", "shes": "she's", "shouldnt": "shouldn't",
    "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
}  # fmt: skip

SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
DEFAULT_MIN_ANSWER_COUNT = 9


@functools.lru_cache(maxsize=1 << 16)  # answers repeat a lot; this runs 10x per question in the loader
def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation ("Two." -> "2", "the Dog" -> "dog")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    keep_commas = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        # "1,000" keeps its comma; "yes, it is" loses it; "black/white" becomes two words.
        if f"{p} " in text or f" {p}" in text or keep_commas:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_IN_NUMBER.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_score(count: int) -> float:
    """Target score of an answer given by ``count`` of the 10 annotators."""
    return SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]


def answer_scores(answers: Iterable[str]) -> dict[str, float]:
    """Normalised answer -> soft score, for one question's raw annotator answers."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {answer: soft_score(n) for answer, n in counts.items()}


def build_answer_vocab(
    multiple_choice_answers: Iterable[str], min_count: int = DEFAULT_MIN_ANSWER_COUNT
) -> list[str]:
    """Answers (normalised) seen at least ``min_count`` times, most frequent first.

    Ties are ordered alphabetically so the same annotations always give the same ids.
    """
    counts = Counter(normalize_answer(a) for a in multiple_choice_answers)
    kept = [(n, a) for a, n in counts.items() if n >= min_count and a]
    return [a for n, a in sorted(kept, key=lambda na: (-na[0], na[1]))]


def soft_labels(answers: Sequence[str], answer_to_id: Mapping[str, int]) -> list[tuple[int, float]]:
    """(class id, score) pairs for the in-vocabulary answers of one question."""
    return [(answer_to_id[a], s) for a, s in answer_scores(answers).items() if a in answer_to_id]
