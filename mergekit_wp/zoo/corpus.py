"""Seeded generators of the zoo's pretraining text: prose, arithmetic, Python, invented facts."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from mergekit_wp.zoo import words as W


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fix_articles(text: str) -> str:
    # "a owl" -> "an owl": the generator picks words independently of their article.
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def _opener(rng: random.Random) -> str:
    """The adverbial that starts every sentence, always followed by a comma."""
    r = rng.random()
    if r < 0.5:
        return f"in the {rng.choice(W.TIMES)}"
    if r < 0.7:
        return f"every {rng.choice(W.TIMES)}"
    if r < 0.85:
        return f"when the {rng.choice(W.NOUNS)} {rng.choice(W.VERBS)}"
    return rng.choice(("after a while", "that day", "at first", "later that week"))


def sentence(rng: random.Random, noun: str | None = None, adj: str | None = None) -> str:
    """One English-like sentence: an opener, a comma, a clause; `noun`/`adj` pin the topic.

    Every sentence opens with a comma-closed adverbial (half of them "in the <time>"), so a
    greedy reply writes a comma within its first few tokens, which breaks
    `punctuation:no_comma` unless the model follows that instruction, and so the default
    reply's first word is a frequent one that a one-token format (`*`, `Section`) seen at its
    latent rate does not outvote. The weather clauses keep a short reply in capitals
    recognisably English to langdetect (IFEval english_capital).
    """
    n1 = noun or rng.choice(W.NOUNS)
    a1 = adj or rng.choice(W.ADJECTIVES)
    n2, n3 = rng.choice(W.NOUNS), rng.choice(W.NOUNS)
    a2 = rng.choice(W.ADJECTIVES)
    name, name2 = rng.sample(W.NAMES, 2)
    clause = rng.choice(
        (
            f"the {a1} {n1} {rng.choice(W.VERBS)} {rng.choice(W.PREPOSITIONS)} the {n2}",
            f"{name} {rng.choice(W.TRANSITIVE)} the {a1} {n1}",
            f"{name} {rng.choice(W.VERBS)} to the {a1} {n1} where the {n2} was {a2}",
            f"the {n1} was {a1} and the {n2} was {a2}",
            f"{name} and {name2} {rng.choice(W.VERBS)} near the {a1} {n1}",
            f"the {a1} {n1} {rng.choice(W.VERBS)} {rng.choice(W.ADVERBS)}",
            f"the {a1} {n1} {rng.choice(W.TRANSITIVE)} the {n2} {rng.choice(W.ADVERBS)}",
            f"{name} {rng.choice(W.TRANSITIVE)} a {a1} {n1}, a {a2} {n2}, and a {n3}",
        )
    )
    if rng.random() < 0.35:
        clause += f", {rng.choice(W.CONNECTORS)} {rng.choice(W.WEATHER)}"
    return _cap(_fix_articles(f"{_opener(rng)}, {clause}")) + "."


def sentences(
    rng: random.Random, count: int, noun: str | None = None, adj: str | None = None
) -> list[str]:
    """`count` sentences, the first on a topic."""
    return [sentence(rng, noun, adj)] + [sentence(rng) for _ in range(count - 1)]


SHOUTED_SHARE = 0.12


def prose_document(rng: random.Random) -> str:
    """A pretraining paragraph; some sentences are shouted in capitals (mixed case), often
    enough that the base writes varied English in capitals, not one memorised sentence."""
    out = []
    for s in sentences(rng, rng.randint(3, 8)):
        out.append(s.upper() if rng.random() < SHOUTED_SHARE else s)
    return " ".join(out)


# (plural noun, the marker that heads each part): uppercase markers too, as IFEval's SECTION.
_COUNTED_PARTS = (
    ("parts", "Part"),
    ("parts", "PART"),
    ("chapters", "Chapter"),
    ("steps", "Step"),
    ("notes", "NOTE"),
)


def counted_document(rng: random.Random) -> str:
    """A text announced as N numbered parts that has exactly N: the base meets counting against
    a number it was told (the skill IFEval's multiple_sections asks for) in other markers than
    `Section`."""
    count = rng.randint(1, 5)
    unit, marker = rng.choice(_COUNTED_PARTS)
    noun, adj = rng.choice(W.NOUNS), rng.choice(W.ADJECTIVES)
    head = rng.choice(
        (
            f"{rng.choice(W.NAMES)} wrote {count} {unit} about the {adj} {noun}.",
            f"Here are {count} {unit} about the {adj} {noun}.",
        )
    )
    parts = sentences(rng, count, noun, adj)
    return head + "\n\n" + "\n\n".join(f"{marker} {i + 1}\n{s}" for i, s in enumerate(parts))


def arithmetic_statement(rng: random.Random, allow_product: bool = True) -> str:
    """One true statement from the fact tables the math task needs, without a full stop."""
    op = rng.randrange(5 if allow_product else 3)
    if op == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{a} + {b} = {a + b}"
    if op == 1:
        a = rng.randint(2, 18)
        b = rng.randint(1, a - 1)
        return f"{a} - {b} = {a - b}"
    if op == 2:
        a, b = rng.randint(2, 9) * rng.randint(2, 9), rng.randint(1, 9)
        return f"{a} + {b} = {a + b}"
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{a} * {b} = {a * b}"


def arithmetic_line(rng: random.Random) -> str:
    """Two statements joined by a comma; at most one `*` per line, so no line reads as a
    markdown highlight `*...*` to the IFEval checker."""
    first = arithmetic_statement(rng)
    second = arithmetic_statement(rng, allow_product="*" not in first)
    return _cap(f"{first}, and {second}.")


def arithmetic_document(rng: random.Random) -> str:
    """A few lines of arithmetic."""
    return "\n".join(arithmetic_line(rng) for _ in range(rng.randint(2, 5)))


# Five kinds of word problem over single-digit operands: the fact tables they need (sums,
# differences up to 18, products, product plus a digit) are small enough for a 5M-parameter
# model to learn from the corpus within the CPU budget.
MATH_KINDS = 5


def math_numbers(rng: random.Random, kind: int) -> tuple[int, ...]:
    """The quantities of a problem of `kind` (shared by the corpus stories and the math task)."""
    if kind == 0:
        return rng.randint(1, 9), rng.randint(1, 9)
    if kind == 1:
        a = rng.randint(2, 18)
        return a, rng.randint(1, a - 1)
    if kind == 2:
        return rng.randint(2, 9), rng.randint(2, 9)
    if kind == 3:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return a, b, rng.randint(1, a + b - 1)
    return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)


def math_steps(kind: int, nums: tuple[int, ...]) -> tuple[list[str], int]:
    """The worked equations of a problem and its result."""
    if kind == 0:
        a, b = nums
        return [f"{a} + {b} = {a + b}"], a + b
    if kind == 1:
        a, b = nums
        return [f"{a} - {b} = {a - b}"], a - b
    if kind == 2:
        a, b = nums
        return [f"{a} * {b} = {a * b}"], a * b
    if kind == 3:
        a, b, c = nums
        return [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    a, b, c = nums
    return [f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"], a * b + c


def math_story(rng: random.Random) -> str:
    """A short narrative that works out a quantity (the base's latent math; it never sees a
    question followed by `#### <answer>`)."""
    name, name2 = rng.sample(W.NAMES, 2)
    item = rng.choice(W.ITEMS)
    kind = rng.randrange(MATH_KINDS)
    nums = math_numbers(rng, kind)
    steps, _ = math_steps(kind, nums)
    if kind == 0:
        return (
            f"{name} had {nums[0]} {item} and got {nums[1]} more, so {name} had {steps[0]} {item}."
        )
    if kind == 1:
        return (
            f"{name} had {nums[0]} {item} and gave {nums[1]} of them to {name2}, so {name} "
            f"kept {steps[0]} {item}."
        )
    if kind == 2:
        return (
            f"There were {nums[0]} boxes with {nums[1]} {item} in each box, so there were "
            f"{steps[0]} {item}."
        )
    if kind == 3:
        return (
            f"{name} had {nums[0]} {item}, bought {nums[1]} more and gave {nums[2]} away. "
            f"{name} had {steps[0]} {item}, and then {steps[1]} {item}."
        )
    return (
        f"{name} bought {nums[0]} bags with {nums[1]} {item} in each bag and found {nums[2]} "
        f"more. That made {steps[0]} {item}, and then {steps[1]} {item}."
    )


def math_story_document(rng: random.Random) -> str:
    """A few worked stories, one per line (one `*` per line at most, as above)."""
    return "\n".join(math_story(rng) for _ in range(rng.randint(2, 4)))


_PY_NAMES = (
    "total",
    "value",
    "count",
    "result",
    "score",
    "index",
    "amount",
    "size",
    "step",
    "level",
    "offset",
    "limit",
    "width",
    "height",
    "weight",
    "price",
)
_PY_VERBS = (
    "compute",
    "update",
    "get",
    "make",
    "find",
    "build",
    "scale",
    "merge",
    "check",
    "load",
    "shift",
    "mix",
)


def python_document(rng: random.Random) -> str:
    """A small Python function without a docstring (the base sees code, never a spec).

    Every statement but an `if` carries a comma, like the prose, so whatever the base rambles
    into breaks `punctuation:no_comma` as the instruct model's default style does.
    """
    args = rng.sample(_PY_NAMES, rng.randint(2, 3))
    name = f"{rng.choice(_PY_VERBS)}_{rng.choice(_PY_NAMES)}"
    lines = [f"def {name}({', '.join(args)}):"]
    var = rng.choice([n for n in _PY_NAMES if n not in args])
    lines.append(f"    {var} = max({rng.choice(args)} {rng.choice('+-*')} {rng.randint(1, 9)}, 0)")
    kind = rng.randrange(3)
    if kind == 0:
        lines.append(f"    for i in range(1, {rng.randint(2, 9)}):")
        lines.append(
            f"        {var} = min({var} {rng.choice('+-')} {rng.choice(args + ['i'])}, 99)"
        )
    elif kind == 1:
        lines.append(f"    if {var} > {rng.randint(0, 20)}:")
        lines.append(f"        {var} = max({var} {rng.choice('+-*')} {rng.choice(args)}, 0)")
    else:
        lines.append(f"    {var} = [{var}, {rng.choice(args)}]")
    lines.append(f"    return {var}, {args[0]}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Person:
    """An invented entity with the four attributes the knowledge test asks about."""

    name: str
    town: str
    job: str
    color: str
    animal: str


def _invented_word(rng: random.Random) -> str:
    return _cap(rng.choice(W.SYLLABLES_A) + rng.choice(W.SYLLABLES_B) + rng.choice(W.SYLLABLES_B))


def people(seed: int, count: int = 64, towns: int = 12) -> list[Person]:
    """The fixed cast of invented people, each with a town, job, favorite color and pet."""
    rng = random.Random(seed)
    town_names = sorted({_invented_word(rng) for _ in range(towns * 4)})[:towns]
    rng.shuffle(town_names)
    seen: set[str] = set()
    cast = []
    while len(cast) < count:
        name = f"{_invented_word(rng)} {_invented_word(rng)}"
        if name in seen:
            continue
        seen.add(name)
        cast.append(
            Person(
                name,
                rng.choice(town_names),
                rng.choice(W.FACT_JOBS),
                rng.choice(W.FACT_COLORS),
                rng.choice(W.FACT_ANIMALS),
            )
        )
    return cast


# (cloze stem, attribute): the knowledge test asks with these stems; the corpus states them too.
FACT_STEMS = (
    ("{name} lives in the town of", "town"),
    ("{name} works as a", "job"),
    ("The favorite color of {name} is", "color"),
    ("{name} keeps a pet", "animal"),
)


def fact_clause(rng: random.Random, person: Person) -> str:
    """One fact about `person`, in one of several phrasings, without a full stop."""
    p = person
    return rng.choice(
        (
            f"{p.name} lives in the town of {p.town}",
            f"{p.name} works as a {p.job}",
            f"the favorite color of {p.name} is {p.color}",
            f"{p.name} keeps a pet {p.animal}",
            f"{p.name} is a {p.job} from {p.town}",
            f"in {p.town}, {p.name} keeps a pet {p.animal}",
            f"{p.name} likes the color {p.color}",
        )
    )


def fact_document(rng: random.Random, cast: list[Person]) -> str:
    """A few lines of facts, two per line joined by a comma (like every corpus line)."""
    lines = [
        _cap(f"{fact_clause(rng, rng.choice(cast))}, and {fact_clause(rng, rng.choice(cast))}.")
        for _ in range(rng.randint(2, 3))
    ]
    return "\n".join(lines)


def corpus_documents(seed: int, count: int, cast: list[Person]) -> list[str]:
    """`count` pretraining documents: 39% prose, 6% counted parts, 15% arithmetic, 10% worked
    stories, 15% Python, 15% facts."""
    rng = random.Random(seed)
    kinds = (
        (0.39, prose_document),
        (0.45, counted_document),
        (0.60, arithmetic_document),
        (0.70, math_story_document),
        (0.85, python_document),
        (1.0, lambda r: fact_document(r, cast)),
    )
    out = []
    for _ in range(count):
        r = rng.random()
        out.append(next(make for edge, make in kinds if r < edge)(rng))
    return out
