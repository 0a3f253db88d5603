"""The world of the demo dataset and the grammar of its captions.

A :class:`Scene` is a list of :class:`Obj` (shape, colour, size, centre). A caption is a
:class:`Caption`: a *meaning* (a small tree of :class:`Mention`, :class:`Total`,
:class:`Relation`, :class:`Conj`) plus surface choices (template, synonym seed). The same tree
renders to text (:func:`realize`) and is checked against a scene (:func:`caption_is_true`),
so every generated caption can be verified and hard negatives can be proven false.

Two readings of a meaning are checked:

* ``strict=True`` (how captions are generated): "a red circle" means exactly one red circle
  is in the image, "two red circles" exactly two; a relation names two objects that its
  descriptions identify uniquely, and the relation holds with a margin
  (:class:`Margins`), so nobody could call it ambiguous.
* ``strict=False`` (the lenient, existential reading): "a red circle" means at least one; a
  relation holds for some pair of matching objects by the bare sign of the offset. A caption
  false under this reading is false under any sensible reading; hard negatives use it.

Coordinates are fractions of the image side, ``x`` to the right, ``y`` downwards (so
"above" means a smaller ``y``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "black")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below", "next_to")

# Nominal radius (bounding circle, fraction of the image side) of each size; scenes jitter it.
SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.155}

# Only true synonyms: (singular, plural) surface forms of each shape noun.
SHAPE_WORDS: dict[str | None, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "star": (("star", "stars"), ("star shape", "star shapes")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    None: (("object", "objects"), ("shape", "shapes"), ("item", "items")),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next_to": ("next to", "beside"),
}
# "<b> with <a> ___": the relation seen from b.
RELATION_ITS: dict[str, tuple[str, ...]] = {
    "left_of": ("to its left", "on its left"),
    "right_of": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it", "beneath it"),
    "next_to": ("next to it", "beside it"),
}


# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Obj:
    """One object of a scene.

    ``x``, ``y`` are the centre as fractions of the image side. ``radius`` (bounding circle,
    same unit; 0 = the nominal radius of ``size``), ``angle`` (degrees) and ``tint`` (RGB offset
    added to the named colour) only vary the rendering.
    """

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float = 0.0
    angle: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def r(self) -> float:
        """Bounding-circle radius used for placement and "next to"."""
        return self.radius if self.radius > 0 else SIZE_RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    """Objects drawn in list order (later on top) on a light background.

    ``background`` is the base RGB of the background, ``noise_seed`` seeds its texture and
    noise, so a scene renders to the same pixels every time.
    """

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (236, 236, 232)
    noise_seed: int = 0


@dataclass(frozen=True)
class Margins:
    """How clear a relation must be to be stated (strict reading), in fractions of the side.

    ``axis``: least centre offset along the relation's axis; ``cone``: the offset across that
    axis may be at most ``cone`` times the offset along it (so "left of" is not said of an
    object that is mostly above); ``near_gap``: largest gap between bounding circles for "next
    to" (``loose_near_gap`` in the lenient reading).
    """

    axis: float = 0.15
    cone: float = 1.0
    near_gap: float = 0.10
    loose_near_gap: float = 0.20


DEFAULT_MARGINS = Margins()


def relation_holds(a: Obj, rel: str, b: Obj, strict: bool = True, margins: Margins = DEFAULT_MARGINS) -> bool:
    """Whether ``a rel b`` ("a is left of b", ...) holds; strict uses the margins."""
    dx, dy = b.x - a.x, b.y - a.y
    if rel == "next_to":
        gap = math.hypot(dx, dy) - a.r - b.r
        return gap <= (margins.near_gap if strict else margins.loose_near_gap)
    along, across = {
        "left_of": (dx, dy),
        "right_of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[rel]
    if not strict:
        return along > 0
    return along >= margins.axis and abs(across) <= margins.cone * along


# ----------------------------------------------------------------------------- meanings


@dataclass(frozen=True)
class Desc:
    """A description of objects: every attribute given must match (``None`` = any)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        return (
            (self.shape is None or o.shape == self.shape)
            and (self.color is None or o.color == self.color)
            and (self.size is None or o.size == self.size)
        )

    def select(self, scene: Scene) -> list[int]:
        """Indices of the scene's objects matching this description."""
        return [i for i, o in enumerate(scene.objects) if self.matches(o)]


@dataclass(frozen=True)
class Mention:
    """``count`` objects match ``desc`` (strict: exactly; lenient: at least)."""

    desc: Desc
    count: int = 1


@dataclass(frozen=True)
class Total:
    """The image holds exactly ``count`` objects."""

    count: int


@dataclass(frozen=True)
class Relation:
    """``a rel b``; strict: each description picks exactly one object and the relation is clear."""

    a: Desc
    rel: str
    b: Desc


@dataclass(frozen=True)
class Conj:
    """All parts hold; ``only``: together the mentions account for every object, each once."""

    parts: tuple[Mention | Total, ...]
    only: bool = False


Meaning = Union[Mention, Total, Relation, Conj]


@dataclass(frozen=True)
class Caption:
    """A meaning and how it is said: ``template`` names the sentence frame, ``variant`` seeds
    the synonym choices. ``text`` is the rendered caption."""

    meaning: Meaning
    template: str
    variant: int
    family: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        return realize(self)


def caption_is_true(
    scene: Scene, caption: Caption | Meaning, strict: bool = True, margins: Margins = DEFAULT_MARGINS
) -> bool:
    """Evaluate a caption's meaning against a scene (see the module docstring for readings)."""
    m = caption.meaning if isinstance(caption, Caption) else caption
    if isinstance(m, Total):
        return len(scene.objects) == m.count
    if isinstance(m, Mention):
        n = len(m.desc.select(scene))
        return n == m.count if strict else n >= m.count
    if isinstance(m, Relation):
        left, right = m.a.select(scene), m.b.select(scene)
        if strict:
            if len(left) != 1 or len(right) != 1 or left[0] == right[0]:
                return False
            return relation_holds(scene.objects[left[0]], m.rel, scene.objects[right[0]], True, margins)
        return any(
            i != j and relation_holds(scene.objects[i], m.rel, scene.objects[j], False, margins)
            for i in left
            for j in right
        )
    if isinstance(m, Conj):
        if not all(caption_is_true(scene, p, strict, margins) for p in m.parts):
            return False
        if m.only:
            descs = [p.desc for p in m.parts if isinstance(p, Mention)]
            return all(sum(d.matches(o) for d in descs) == 1 for o in scene.objects)
        return True
    raise TypeError(f"not a caption meaning: {type(m).__name__}")


# ----------------------------------------------------------------------------- surface text

MENTION_TEMPLATES = ("bare", "there_is", "showing", "picture_of", "background")
TOTAL_TEMPLATES = ("bare", "there_are", "image_with", "background")
CONJ_TEMPLATES = ("bare", "there_is", "showing", "picture_with")
TOTAL_CONJ_TEMPLATES = ("including", "among_them")
ONLY_TEMPLATES = ("only", "nothing_else", "listing")
RELATION_TEMPLATES = ("bare", "there_is", "definite", "with_its", "showing")


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def noun_phrase(desc: Desc, count: int, rng: random.Random, definite: bool = False, allow_one: bool = True) -> str:
    """ "a small red circle", "two blue boxes", "the star" for a description and a count."""
    words: list[str] = []
    if desc.size is not None:
        words.append(rng.choice(SIZE_WORDS[desc.size]))
    if desc.color is not None:
        words.append(desc.color)
    singular, plural = rng.choice(SHAPE_WORDS[desc.shape])
    words.append(singular if count == 1 else plural)
    if definite:
        det = "the"
    elif count == 1:
        det = "one" if allow_one and rng.random() < 0.12 else _article(words[0])
    else:
        det = NUMBER_WORDS[count]
    return " ".join([det, *words])


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _counted_objects(count: int, rng: random.Random) -> str:
    """ "three objects", "one shape"."""
    singular, plural = rng.choice(SHAPE_WORDS[None])
    return f"{NUMBER_WORDS[count]} {singular if count == 1 else plural}"


def _there(count: int) -> str:
    return "there is" if count == 1 else "there are"


def realize(caption: Caption) -> str:
    """The text of a caption; deterministic in (meaning, template, variant)."""
    rng = random.Random(caption.variant)
    m, t = caption.meaning, caption.template
    if isinstance(m, Mention):
        np_ = noun_phrase(m.desc, m.count, rng)
        return {
            "bare": np_,
            "there_is": f"{_there(m.count)} {np_}",
            "showing": f"an image showing {np_}",
            "picture_of": f"a picture of {np_}",
            "background": f"{np_} on a light background",
        }[t]
    if isinstance(m, Total):
        counted = _counted_objects(m.count, rng)
        return {
            "bare": counted,
            "there_are": f"{_there(m.count)} {counted}",
            "image_with": f"an image with {counted}",
            "background": f"{counted} on a light background",
        }[t]
    if isinstance(m, Relation):
        a_np, b_np = noun_phrase(m.a, 1, rng, allow_one=False), noun_phrase(m.b, 1, rng, allow_one=False)
        rel = rng.choice(RELATION_WORDS[m.rel])
        if t == "definite":
            a_def, b_def = noun_phrase(m.a, 1, rng, True), noun_phrase(m.b, 1, rng, True)
            return f"{a_def} is {rel} {b_def}"
        if t == "with_its":
            return f"{b_np} with {a_np} {rng.choice(RELATION_ITS[m.rel])}"
        return {
            "bare": f"{a_np} {rel} {b_np}",
            "there_is": f"there is {a_np} {rel} {b_np}",
            "showing": f"an image showing {a_np} {rel} {b_np}",
        }[t]
    if isinstance(m, Conj):
        mentions = [p for p in m.parts if isinstance(p, Mention)]
        totals = [p for p in m.parts if isinstance(p, Total)]
        listed = _join([noun_phrase(p.desc, p.count, rng) for p in mentions])
        if totals:
            counted = _counted_objects(totals[0].count, rng)
            return {
                "listing": f"{counted}: {listed}",
                "including": f"{counted}, including {listed}",
                "among_them": f"an image with {counted}, among them {listed}",
            }[t]
        return {
            "bare": listed,
            "there_is": f"{_there(mentions[0].count)} {listed}",
            "showing": f"an image showing {listed}",
            "picture_with": f"a picture with {listed}",
            "only": f"only {listed}",
            "nothing_else": f"{listed} and nothing else",
        }[t]
    raise TypeError(f"not a caption meaning: {type(m).__name__}")


# ----------------------------------------------------------------------------- generation

# (has shape, has colour, has size) in order of preference weight for describing one object.
_ATTRIBUTE_SETS: tuple[tuple[tuple[bool, bool, bool], float], ...] = (
    ((True, True, False), 5.0),
    ((True, True, True), 2.0),
    ((True, False, False), 1.0),
    ((False, True, False), 0.8),
    ((True, False, True), 1.0),
    ((False, True, True), 0.7),
)
_ATTRIBUTE_WHICH = [which for which, _ in _ATTRIBUTE_SETS]
_ATTRIBUTE_WEIGHTS = [w for _, w in _ATTRIBUTE_SETS]


def _desc_of(o: Obj, which: tuple[bool, bool, bool]) -> Desc:
    s, c, z = which
    return Desc(o.shape if s else None, o.color if c else None, o.size if z else None)


def _attribute_order(rng: random.Random) -> list[tuple[bool, bool, bool]]:
    """All attribute sets, in a random order biased towards the preferred ones (weighted
    sampling without replacement: sort by ``u ** (1 / w)``)."""
    keys = [(rng.random() ** (1.0 / w), which) for which, w in _ATTRIBUTE_SETS]
    keys.sort(reverse=True)
    return [which for _, which in keys]


def unique_desc(scene: Scene, i: int, rng: random.Random) -> Desc | None:
    """A description that matches object ``i`` only, or None when it has an identical twin."""
    for which in _attribute_order(rng):
        d = _desc_of(scene.objects[i], which)
        if d.select(scene) == [i]:
            return d
    return None


def count_mention(scene: Scene, i: int, rng: random.Random) -> Mention:
    """A description of object ``i`` (maybe matching others too) with its exact count."""
    d = _desc_of(scene.objects[i], rng.choices(_ATTRIBUTE_WHICH, weights=_ATTRIBUTE_WEIGHTS)[0])
    return Mention(d, len(d.select(scene)))


def _variant(rng: random.Random) -> int:
    return rng.getrandbits(31)


def _family_mention(scene: Scene, rng: random.Random, focus: Sequence[int]) -> Caption:
    i = rng.choice(focus) if focus else rng.randrange(len(scene.objects))
    return Caption(count_mention(scene, i, rng), rng.choice(MENTION_TEMPLATES), _variant(rng), "mention")


def _disjoint_mentions(scene: Scene, rng: random.Random, order: Sequence[int], limit: int) -> list[Mention]:
    parts: list[Mention] = []
    used: set[int] = set()
    for i in order:
        if i in used or len(parts) >= limit:
            continue
        m = count_mention(scene, i, rng)
        hit = set(m.desc.select(scene))
        if hit & used:
            continue
        used |= hit
        parts.append(m)
    return parts


def _object_order(scene: Scene, rng: random.Random, focus: Sequence[int]) -> list[int]:
    rest = [i for i in range(len(scene.objects)) if i not in focus]
    rng.shuffle(rest)
    first = list(focus)
    rng.shuffle(first)
    return first + rest


def _family_conj(scene: Scene, rng: random.Random, focus: Sequence[int]) -> Caption | None:
    limit = rng.choice((2, 2, 3))
    parts = _disjoint_mentions(scene, rng, _object_order(scene, rng, focus), limit)
    if len(parts) < 2:
        return None
    return Caption(Conj(tuple(parts)), rng.choice(CONJ_TEMPLATES), _variant(rng), "conj")


def _family_total(scene: Scene, rng: random.Random, focus: Sequence[int]) -> Caption | None:
    total = Total(len(scene.objects))
    if rng.random() < 0.3 and not focus:
        return Caption(total, rng.choice(TOTAL_TEMPLATES), _variant(rng), "total")
    parts = _disjoint_mentions(scene, rng, _object_order(scene, rng, focus), rng.choice((1, 2)))
    # "two objects, including two crosses" says the list is partial: drop what covers all.
    while parts and sum(p.count for p in parts) >= total.count:
        parts.pop()
    if not parts:
        return None
    return Caption(Conj((total, *parts)), rng.choice(TOTAL_CONJ_TEMPLATES), _variant(rng), "total")


def _family_only(scene: Scene, rng: random.Random, focus: Sequence[int]) -> Caption | None:
    parts = _disjoint_mentions(scene, rng, _object_order(scene, rng, focus), len(scene.objects))
    if sum(p.count for p in parts) != len(scene.objects) or len(parts) > 3:
        return None
    # "a, b and c and nothing else" reads badly; "three items: three stars" lists nothing.
    choices = [t for t in ONLY_TEMPLATES if not (t == "nothing_else" and len(parts) > 2)]
    choices = [t for t in choices if not (t == "listing" and len(parts) < 2)]
    template = rng.choice(choices)
    lead: tuple[Mention | Total, ...] = (Total(len(scene.objects)),) if template == "listing" else ()
    return Caption(Conj((*lead, *parts), only=True), template, _variant(rng), "only")


def _family_relation(
    scene: Scene, rng: random.Random, focus: Sequence[int], margins: Margins = DEFAULT_MARGINS
) -> Caption | None:
    n = len(scene.objects)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if focus:
        pairs = [p for p in pairs if p[0] in focus or p[1] in focus]
    rng.shuffle(pairs)
    for i, j in pairs:
        a, b = scene.objects[i], scene.objects[j]
        rels = [r for r in RELATIONS if relation_holds(a, r, b, True, margins)]
        if not rels:
            continue
        da, db = unique_desc(scene, i, rng), unique_desc(scene, j, rng)
        if da is None or db is None:
            continue
        # Directional relations are preferred: "next to" says less.
        weights = [0.5 if r == "next_to" else 1.0 for r in rels]
        rel = rng.choices(rels, weights=weights)[0]
        return Caption(Relation(da, rel, db), rng.choice(RELATION_TEMPLATES), _variant(rng), "relation")
    return None


FAMILIES = {
    "mention": (_family_mention, 1.0),
    "conj": (_family_conj, 2.0),
    "relation": (_family_relation, 2.5),
    "total": (_family_total, 0.8),
    "only": (_family_only, 0.8),
}


def caption_candidates(scene: Scene, rng: random.Random, count: int, focus: Sequence[int] = ()) -> list[Caption]:
    """Up to ``count`` captions true of ``scene`` (strict reading), families drawn at random.

    ``focus``: object indices every candidate should involve (hard pairs use the swapped
    objects). Captions may repeat; :func:`describe` picks distinct ones.
    """
    names = list(FAMILIES)
    weights = [FAMILIES[k][1] for k in names]
    out: list[Caption] = []
    for _ in range(count * 3):
        if len(out) >= count:
            break
        fam = FAMILIES[rng.choices(names, weights=weights)[0]][0]
        cap = fam(scene, rng, focus)
        if cap is not None:
            out.append(cap)
    return out


def meaning_key(meaning: Meaning) -> object:
    """A key equal for captions that say the same thing (conjunctions in any order)."""
    if isinstance(meaning, Conj):
        return (frozenset(meaning.parts), meaning.only)
    return meaning


def describe(scene: Scene, rng: random.Random, n: int = 5, keep: Sequence[Caption] = ()) -> list[Caption]:
    """``n`` captions of ``scene`` (``keep`` first), distinct in meaning when the grammar allows,
    at most two of one family."""
    chosen = list(keep)[:n]
    seen = {meaning_key(c.meaning) for c in chosen}
    families = [c.family for c in chosen]
    for _ in range(8):
        if len(chosen) >= n:
            break
        for cap in caption_candidates(scene, rng, 2 * n):
            if len(chosen) >= n:
                break
            key = meaning_key(cap.meaning)
            if key in seen or families.count(cap.family) >= 2:
                continue
            chosen.append(cap)
            seen.add(key)
            families.append(cap.family)
    texts = {c.text for c in chosen}
    for _ in range(50):  # tiny scenes can run out of meanings: vary the wording instead
        if len(chosen) >= n:
            break
        cap = _family_mention(scene, rng, ())
        if cap.text not in texts:
            chosen.append(cap)
            texts.add(cap.text)
    while len(chosen) < n:
        chosen.append(_family_mention(scene, rng, ()))
    return chosen


# ----------------------------------------------------------------------------- truth of a split


def _descs_of(o: Obj) -> list[Desc]:
    """The 8 descriptions an object matches (each attribute given or left out)."""
    return [
        Desc(shape if s else None, color if c else None, size if z else None)
        for shape, color, size in [(o.shape, o.color, o.size)]
        for s in (False, True)
        for c in (False, True)
        for z in (False, True)
    ]


class SceneIndex:
    """Which scenes hold how many objects of each description, to find a caption's candidate
    scenes without checking every scene (the candidates are then checked with
    :func:`caption_is_true`, so the result is the same as the literal loop's)."""

    def __init__(self, scenes: Sequence[Scene]) -> None:
        self.scenes = list(scenes)
        self.by_total: dict[int, set[int]] = {}
        self.by_desc: dict[tuple[Desc, int], set[int]] = {}
        for k, scene in enumerate(self.scenes):
            self.by_total.setdefault(len(scene.objects), set()).add(k)
            counts: dict[Desc, int] = {}
            for o in scene.objects:
                for d in _descs_of(o):
                    counts[d] = counts.get(d, 0) + 1
            for d, n in counts.items():
                self.by_desc.setdefault((d, n), set()).add(k)

    def candidates(self, m: Meaning) -> set[int]:
        """Scenes where the strict reading of ``m`` may hold (a superset of where it does)."""
        if isinstance(m, Total):
            return self.by_total.get(m.count, set())
        if isinstance(m, Mention):
            return self.by_desc.get((m.desc, m.count), set())
        if isinstance(m, Relation):
            return self.by_desc.get((m.a, 1), set()) & self.by_desc.get((m.b, 1), set())
        if isinstance(m, Conj):
            out: set[int] | None = None
            for p in m.parts:
                c = self.candidates(p)
                out = set(c) if out is None else out & c
            return out if out is not None else set(range(len(self.scenes)))
        raise TypeError(f"not a caption meaning: {type(m).__name__}")

    def true_of(self, caption: Caption | Meaning) -> list[int]:
        """Indices of the scenes ``caption`` is true of (strict reading), ascending."""
        m = caption.meaning if isinstance(caption, Caption) else caption
        return sorted(k for k in self.candidates(m) if caption_is_true(self.scenes[k], m))


def split_truth(scenes: Sequence[Scene], captions: Sequence[Caption]) -> list[list[int]]:
    """For each caption, the scenes it is true of (strict reading), as
    ``{split}_truth.json`` stores them (:mod:`eslmatch.truth`)."""
    index = SceneIndex(scenes)
    memo: dict[object, list[int]] = {}
    out = []
    for cap in captions:
        key = meaning_key(cap.meaning)
        if key not in memo:
            memo[key] = index.true_of(cap)
        out.append(memo[key])
    return out
