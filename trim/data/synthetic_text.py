"""Questions and statements about synthetic scenes, with their answers.

VQA: each question names one or a few objects, so the question decides which image
patches matter. Answers come in the VQA v2 form: 10 annotators, most agreeing, a few
giving a plausible wrong answer, some typing "Two." for "2" (the normalisation must
merge them). ``question_type`` / ``answer_type`` use VQA v2's own values.

NLVR2: a statement about a pair of scenes, true or false. Each statement is reused over
the 4 pairs of its set (identifier ``<split>-<set>-<pair>-<sentence>``), planted so the
labels of a set are balanced; that is what makes NLVR2's consistency metric meaningful.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from trim.data.synthetic import COLORS, SHAPES, SIZES, Obj, Scene, Spec, World, make_scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_COUNT = 8  # a scene has at most 6 random objects plus a few planted ones


def plural(shape: str) -> str:
    return shape + "s"


def _choice(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # already in normalised form
    question_type: str
    answer_type: str
    relevant: tuple[int, ...]  # indices of the objects the answer depends on


def _phrase(obj: Obj, attrs: tuple[str, ...]) -> str:
    words = [getattr(obj, a) for a in ("size", "color") if a in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    return " ".join(words)


def _unique_phrase(scene: Scene, i: int, options: list[tuple[str, ...]]) -> str | None:
    """Shortest phrase among ``options`` (attribute sets) that picks object ``i`` alone."""
    obj = scene.objects[i]
    for attrs in options:
        if scene.count(**{a: getattr(obj, a) for a in attrs}) == 1:
            return _phrase(obj, attrs)
    return None


_REFER = [("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")]


def _q_color(rng, scene: Scene) -> Question | None:
    for i in rng.permutation(len(scene.objects)):
        phrase = _unique_phrase(scene, int(i), [("shape",), ("size", "shape")])
        if phrase:
            return Question(f"what color is the {phrase}?", scene.objects[i].color, "what color is the", "other", (int(i),))
    return None


def _q_shape(rng, scene: Scene) -> Question | None:
    for i in rng.permutation(len(scene.objects)):
        phrase = _unique_phrase(scene, int(i), [("color",), ("size", "color")])
        if phrase:
            obj = scene.objects[i]
            return Question(f"what is the shape of the {phrase}?", obj.shape, "what is the", "other", (int(i),))
    return None


def _q_count(rng, scene: Scene) -> Question:
    obj = _choice(rng, scene.objects)
    color, shape = obj.color, obj.shape
    if rng.random() < 0.2:  # sometimes ask about something absent: the answer is 0
        color, shape = _choice(rng, COLORS), _choice(rng, SHAPES)
    kind = int(rng.integers(3))
    if kind == 0:
        text, attrs = f"how many {color} objects are there?", {"color": color}
    elif kind == 1:
        text, attrs = f"how many {plural(shape)} are there?", {"shape": shape}
    else:
        text, attrs = f"how many {color} {plural(shape)} are there?", {"color": color, "shape": shape}
    relevant = tuple(i for i, o in enumerate(scene.objects) if o.matches(**attrs))
    return Question(text, str(len(relevant)), "how many", "number", relevant)


def _q_exist(rng, scene: Scene) -> Question:
    if rng.random() < 0.5:
        obj = _choice(rng, scene.objects)
        color, shape = obj.color, obj.shape
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if scene.count(color=c, shape=s) == 0]
        color, shape = _choice(rng, absent)
    relevant = tuple(i for i, o in enumerate(scene.objects) if o.matches(color=color, shape=shape))
    return Question(f"is there a {color} {shape}?", "yes" if relevant else "no", "is there a", "yes/no", relevant)


def _q_spatial(rng, scene: Scene) -> Question | None:
    objs = scene.objects
    # Left/right is only asked when no other object sits in the reference's column,
    # so "left of" is never a matter of a pixel.
    for i, side in itertools.product(rng.permutation(len(objs)), rng.permutation(["left", "right"])):
        ref = objs[i]
        phrase = _unique_phrase(scene, int(i), _REFER)
        margin = ref.r
        if phrase is None or any(abs(o.x - ref.x) <= margin for j, o in enumerate(objs) if j != i):
            continue
        beside = [j for j, o in enumerate(objs) if (o.x < ref.x if side == "left" else o.x > ref.x) and j != i]
        if len(beside) == 1:
            j = beside[0]
            return Question(f"what is {side} of the {phrase}?", objs[j].shape, "what is", "other", (int(i), j))
    for i, j in itertools.permutations(rng.permutation(len(objs)), 2):
        a, b = objs[i], objs[j]
        pa, pb = _unique_phrase(scene, int(i), _REFER), _unique_phrase(scene, int(j), _REFER)
        if pa and pb and abs(a.x - b.x) > max(a.r, b.r):
            side = _choice(rng, ["left", "right"])
            truth = a.x < b.x if side == "left" else a.x > b.x
            answer = "yes" if truth else "no"
            return Question(f"is the {pa} {side} of the {pb}?", answer, "is the", "yes/no", (int(i), int(j)))
    return None


QUESTION_KINDS = {"color": _q_color, "shape": _q_shape, "count": _q_count, "exist": _q_exist, "spatial": _q_spatial}


def ask_questions(rng: np.random.Generator, scene: Scene, n: int) -> list[Question]:
    """Up to ``n`` questions of different kinds about one scene."""
    questions: list[Question] = []
    for kind in rng.permutation(list(QUESTION_KINDS)):
        if len(questions) == n:
            break
        q = QUESTION_KINDS[str(kind)](rng, scene)
        if q is not None and all(q.question != other.question for other in questions):
            questions.append(q)
    return questions


def _wrong_answer(rng, q: Question) -> str:
    if q.answer_type == "yes/no":
        return "no" if q.answer == "yes" else "yes"
    if q.answer_type == "number":
        n = int(q.answer)
        return str(max(0, n + _choice(rng, [-1, 1])) if n > 0 else 1)
    pool = COLORS if q.answer in COLORS else SHAPES
    return _choice(rng, [a for a in pool if a != q.answer])


def _raw_variant(rng, answer: str) -> str:
    """How an annotator might type a correct answer; normalises back to ``answer``."""
    if answer.isdigit() and int(answer) < len(NUMBER_WORDS) and rng.random() < 0.5:
        answer = NUMBER_WORDS[int(answer)]
    return _choice(rng, [answer.capitalize(), answer + ".", f" {answer}", answer.upper()])


def annotator_answers(rng: np.random.Generator, q: Question) -> list[dict]:
    """Ten VQA v2 answer records: most agree, 0-3 disagree, a few typed differently."""
    n_wrong = int(_choice(rng, [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]))
    records = []
    for k in rng.permutation(10):
        wrong = k < n_wrong
        text = _wrong_answer(rng, q) if wrong else q.answer
        if not wrong and rng.random() < 0.15:
            text = _raw_variant(rng, text)
        records.append({"answer": text, "answer_confidence": "maybe" if wrong else "yes"})
    return [{**r, "answer_id": i + 1} for i, r in enumerate(records)]


def vqa_answer_space() -> list[str]:
    """Every answer a synthetic question can have (the synthetic answers.json)."""
    return [*COLORS, *SHAPES, *(str(n) for n in range(MAX_COUNT + 1)), "yes", "no"]


# ---------------------------------------------------------------------------- NLVR2


# What each statement kind counts: the attributes an object must match to be counted.
_COUNTED_ATTRIBUTES = {"exactly": ("color", "shape"), "both": ("color", "shape"), "more": ("shape",),
                       "none": ("color",)}


@dataclass(frozen=True)
class Statement:
    kind: str  # exactly | both | more | none
    side: str = "left"
    n: int = 1
    color: str = "red"
    shape: str = "circle"

    @property
    def other(self) -> str:
        return "right" if self.side == "left" else "left"

    def text(self) -> str:
        if self.kind == "exactly":
            noun = self.shape if self.n == 1 else plural(self.shape)
            return f"the {self.side} image has exactly {NUMBER_WORDS[self.n]} {self.color} {noun}"
        if self.kind == "both":
            return f"both images contain a {self.color} {self.shape}"
        if self.kind == "more":
            return f"there are more {plural(self.shape)} in the {self.side} image than in the {self.other} image"
        if self.kind == "none":
            return f"the {self.side} image contains no {self.color} objects"
        raise ValueError(f"unknown statement kind {self.kind!r}")

    def holds(self, left: Scene, right: Scene) -> bool:
        this, that = (left, right) if self.side == "left" else (right, left)
        if self.kind == "exactly":
            return this.count(color=self.color, shape=self.shape) == self.n
        if self.kind == "both":
            return left.count(color=self.color, shape=self.shape) > 0 and right.count(color=self.color, shape=self.shape) > 0
        if self.kind == "more":
            return this.count(shape=self.shape) > that.count(shape=self.shape)
        if self.kind == "none":
            return this.count(color=self.color) == 0
        raise ValueError(f"unknown statement kind {self.kind!r}")

    def relevant(self, left: Scene, right: Scene) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Indices of the objects of (left, right) whose presence decides the label: the ones
        counted. A statement true by absence ("contains no green objects") has none."""
        if self.kind not in _COUNTED_ATTRIBUTES:
            raise ValueError(f"unknown statement kind {self.kind!r}")
        counted = {a: getattr(self, a) for a in _COUNTED_ATTRIBUTES[self.kind]}
        # "both" and "more" compare the two images; "exactly" and "none" read one side only.
        sides = ("left", "right") if self.kind in ("both", "more") else (self.side,)
        return tuple(tuple(i for i, o in enumerate(scene.objects) if name in sides and o.matches(**counted))
                     for name, scene in (("left", left), ("right", right)))

    def plant(self, target: bool) -> tuple[list[Spec], list[Spec]]:
        """Objects to place in (left, right) that make ``target`` likely; checked afterwards."""
        this: list[Spec] = []
        that: list[Spec] = []
        if self.kind == "exactly" and target:
            this = [(self.shape, self.color, None)] * self.n
        elif self.kind == "both" and target:
            this, that = [(self.shape, self.color, None)], [(self.shape, self.color, None)]
        elif self.kind == "more" and target:
            this = [(self.shape, None, None)] * 2
        elif self.kind == "none" and not target:
            this = [(None, self.color, None)]
        return (this, that) if self.side == "left" else (that, this)


STATEMENT_KINDS = ("exactly", "both", "more", "none")


def random_statement(rng: np.random.Generator, near: list[Scene] | None = None) -> Statement:
    """A statement; with ``near``, about colours/shapes that occur in those scenes."""
    if near:
        obj = _choice(rng, [o for s in near for o in s.objects])
        color, shape = obj.color, obj.shape
    else:
        color, shape = _choice(rng, COLORS), _choice(rng, SHAPES)
    return Statement(_choice(rng, STATEMENT_KINDS), _choice(rng, ["left", "right"]), int(rng.integers(1, 4)), color, shape)


def make_pair(rng: np.random.Generator, statement: Statement, target: bool, image_size: int,
              world: World = World()) -> tuple[Scene, Scene]:  # fmt: skip
    """Two scenes for which ``statement`` has truth value ``target`` (rejection sampling)."""
    plant_left, plant_right = statement.plant(target)
    for attempt in range(200):
        planted = attempt % 4 != 3  # now and then an unplanted pair, so planting is no tell
        left = make_scene(rng, image_size, plant_left if planted else (), world)
        right = make_scene(rng, image_size, plant_right if planted else (), world)
        if statement.holds(left, right) == target:
            return left, right
    raise RuntimeError(f"no pair found where {statement.text()!r} is {target}")


@dataclass(frozen=True)
class StatementSet:
    pairs: list[tuple[Scene, Scene]]
    statements: list[Statement]
    labels: list[list[bool]]  # labels[k][p]: statement k on pair p


def make_statement_set(
    rng: np.random.Generator, image_size: int, *, pairs: int = 4, sentences: int = 2, world: World = World()
) -> StatementSet:
    """One NLVR2 set: ``pairs`` image pairs, ``sentences`` statements each judged on every pair.

    Statement 0 is planted to be true on half the pairs; later statements are picked,
    among a few candidates, to be the most balanced over the pairs already drawn.
    """
    first = random_statement(rng)
    targets = [p < pairs // 2 for p in range(pairs)]
    targets = [targets[i] for i in rng.permutation(pairs)]
    scene_pairs = [make_pair(rng, first, t, image_size, world) for t in targets]
    statements, labels = [first], [targets]
    scenes = [s for pair in scene_pairs for s in pair]
    while len(statements) < sentences:
        best = None
        for _ in range(30):
            cand = random_statement(rng, near=scenes)
            if cand.text() in {s.text() for s in statements}:
                continue
            cand_labels = [cand.holds(left, right) for left, right in scene_pairs]
            imbalance = abs(sum(cand_labels) - pairs / 2)
            if best is None or imbalance < best[0]:
                best = (imbalance, cand, cand_labels)
            if imbalance < 1:
                break
        assert best is not None
        statements.append(best[1])
        labels.append(best[2])
    return StatementSet(scene_pairs, statements, labels)


def text_vocabulary() -> list[str]:
    """Every sentence fragment the synthetic text can contain (for the tokenizer)."""
    words = [*COLORS, *SHAPES, *map(plural, SHAPES), *SIZES, *NUMBER_WORDS, *vqa_answer_space()]
    templates = [
        "what color is the object ?",
        "what is the shape of the object ?",
        "how many objects are there ?",
        "is there a",
        "what is left right of the",
        "is the left of the",
        "the left image has exactly",
        "both images contain a",
        "there are more in the image than in the image",
        "the image contains no objects",
    ]
    return words + templates
