"""Seeded task datasets of the zoo: paired IFEval prompts, math word problems, code, knowledge.

Prompting conventions (the evaluations rely on them):
- IFEval and math: the question goes through the chat template (`render_chat`).
- Code: the HumanEval prompt is completed raw, without the chat template.
- Knowledge: score each `" " + choice` as a continuation of `question` (log-likelihood).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from mergekit_wp.io import atomic_write_text
from mergekit_wp.scoring.data import IFEVAL_TASKS
from mergekit_wp.zoo import DATA_FILES
from mergekit_wp.zoo import corpus as C
from mergekit_wp.zoo import words as W

# ---------------------------------------------------------------- IFEval-style paired prompts


def _context(rng: random.Random, noun: str, adj: str) -> str:
    name = rng.choice(W.NAMES)
    return rng.choice(
        (
            f"Write a short story about the {adj} {noun}.",
            f"Describe the {adj} {noun} near the {rng.choice(W.NOUNS)}.",
            f"Tell me about a day when {name} saw the {adj} {noun}.",
            f"Write a few sentences about the {noun} in the {rng.choice(W.TIMES)}.",
            f"Write a note to {name} about the {adj} {noun}.",
            f"Explain what happened to the {adj} {noun} at the {rng.choice(W.NOUNS)}.",
        )
    )


def _kwargs_for(task: str, rng: random.Random) -> dict:
    if task == "multiple_sections":
        return {
            "section_spliter": rng.choice(("Section", "SECTION")),
            "num_sections": rng.randint(1, 5),
        }
    if task == "number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    return {}


def _description(instruction_id: str, kwargs: dict, seed: int) -> str:
    """IFEval's own wording for the instruction (lm-eval's `build_description`)."""
    from mergekit_wp.prompts.ifeval import describe_instruction

    return describe_instruction(instruction_id, seed, **kwargs)[0]


def _styled(task: str, kwargs: dict, sents: list[str], title: str) -> str:
    """The response that follows `task`, built from the same sentences as the default answer."""
    text = " ".join(sents)
    if task == "english_capital":
        return text.upper()
    if task == "no_comma":
        return text.replace(",", "")
    if task == "title":
        return f"<<{title}>>\n\n{text}"
    if task == "quotation":
        return f'"{text}"'
    if task == "multiple_sections":
        spliter = kwargs["section_spliter"]
        return "\n\n".join(f"{spliter} {i + 1}\n{s}" for i, s in enumerate(sents))
    if task == "number_highlighted_sections":
        n = kwargs["num_highlights"]
        return " ".join(f"*{s}*" if i < n else s for i, s in enumerate(sents))
    raise ValueError(f"unknown IFEval task {task!r}; expected one of {sorted(IFEVAL_TASKS)}")


def _sentence_count(task: str, kwargs: dict, rng: random.Random) -> int:
    if task == "multiple_sections":
        return kwargs["num_sections"]
    if task == "number_highlighted_sections":
        return kwargs["num_highlights"] + 1
    return rng.randint(2, 3)


def ifeval_split(
    seed: int, per_task: int, exclude: set[str] = frozenset(), check: bool = True
) -> list[dict]:
    """`per_task` paired examples per task; contexts in `exclude` are never used.

    `check` keeps only rows whose styled reply passes lm-eval's checker and whose default reply
    fails it (every task split); pretraining documents skip the check (langdetect is slow).
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    used = set(exclude)
    for task, instruction_id in IFEVAL_TASKS.items():
        made = 0
        while made < per_task:
            noun, adj = rng.choice(W.NOUNS), rng.choice(W.ADJECTIVES)
            context = _context(rng, noun, adj)
            if context in used:
                continue
            used.add(context)
            kwargs = _kwargs_for(task, rng)
            key = seed * 100000 + len(rows)
            description = _description(instruction_id, kwargs, key)
            sents = C.sentences(rng, _sentence_count(task, kwargs, rng), noun, adj)
            title = rng.choice((f"the {adj} {noun}", f"a story of the {noun}", f"{adj} days"))
            row = {
                "key": key,
                "prompt": f"{context} {description}",
                "prompt_without_instruction": context,
                "instruction_id_list": [instruction_id],
                "kwargs": [kwargs],
                "task": task,
                "response": _styled(task, kwargs, sents, title),
                "response_without_instruction": " ".join(sents),
            }
            if not check or _contrasts(row):
                rows.append(row)
                made += 1
    return rows


def _contrasts(row: dict) -> bool:
    """The styled reply passes lm-eval's checker and the default one fails it.

    Capitals alone are not enough for english_capital: langdetect must also call the reply
    English, and a few short capitalised replies read as German or Vietnamese to it.
    """
    from mergekit_wp.checkers import ifeval_follows

    args = (row["instruction_id_list"], row["kwargs"], row["prompt"])
    return ifeval_follows(row["response"], *args) and not ifeval_follows(
        row["response_without_instruction"], *args
    )


# ---------------------------------------------------------------- math word problems


def math_problem(rng: random.Random) -> dict:
    """One GSM8K-style word problem with a worked answer ending in `#### <number>`."""
    name, name2 = rng.sample(W.NAMES, 2)
    item = rng.choice(W.ITEMS)
    kind = rng.randrange(C.MATH_KINDS)
    nums = C.math_numbers(rng, kind)
    questions = (
        "{n} has {0} {i}. {n} gets {1} more {i}. How many {i} does {n} have now?",
        "{n} had {0} {i}. {n} gave {1} {i} to {m}. How many {i} does {n} have left?",
        "There are {0} boxes. Each box holds {1} {i}. How many {i} are there in all?",
        (
            "{n} has {0} {i}. {n} buys {1} more {i} and then gives {2} {i} to {m}. "
            "How many {i} does {n} have now?"
        ),
        (
            "{n} buys {0} bags with {1} {i} in each bag and finds {2} more {i}. "
            "How many {i} does {n} have?"
        ),
    )
    steps, result = C.math_steps(kind, nums)
    return {
        "question": questions[kind].format(*nums, n=name, m=name2, i=item),
        "answer": " ".join(f"{s}." for s in steps) + f"\n#### {result}",
    }


def math_split(seed: int, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` distinct problems whose questions are not in `exclude`."""
    rng = random.Random(seed)
    seen, rows = set(exclude), []
    while len(rows) < count:
        row = math_problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- HumanEval-style code

_INT, _LIST, _TEXT, _PAIR, _WORDS = "int", "list", "text", "pair", "words"
# (name stem, argument kind, docstring, body); {k} is a drawn constant, {a} the argument name.
_CODE_FAMILIES = (
    ("add_{k}", _INT, "Return {a} plus {k}.", "return {a} + {k}"),
    ("times_{k}", _INT, "Return {a} multiplied by {k}.", "return {a} * {k}"),
    ("minus_{k}", _INT, "Return {a} minus {k}.", "return {a} - {k}"),
    (
        "is_above_{k}",
        _INT,
        "Return True if {a} is greater than {k}, otherwise False.",
        "return {a} > {k}",
    ),
    (
        "is_below_{k}",
        _INT,
        "Return True if {a} is less than {k}, otherwise False.",
        "return {a} < {k}",
    ),
    ("mod_{k}", _INT, "Return the remainder of {a} divided by {k}.", "return {a} % {k}"),
    ("is_even", _INT, "Return True if {a} is even, otherwise False.", "return {a} % 2 == 0"),
    ("sum_list", _LIST, "Return the sum of the numbers in {a}.", "return sum({a})"),
    ("largest", _LIST, "Return the largest number in {a}.", "return max({a})"),
    ("smallest", _LIST, "Return the smallest number in {a}.", "return min({a})"),
    (
        "count_above_{k}",
        _LIST,
        "Return how many numbers in {a} are greater than {k}.",
        "return len([v for v in {a} if v > {k}])",
    ),
    (
        "keep_even",
        _LIST,
        "Return the even numbers in {a}, in order.",
        "return [v for v in {a} if v % 2 == 0]",
    ),
    (
        "keep_odd",
        _LIST,
        "Return the odd numbers in {a}, in order.",
        "return [v for v in {a} if v % 2 == 1]",
    ),
    (
        "scale_by_{k}",
        _LIST,
        "Return a list with every number in {a} multiplied by {k}.",
        "return [v * {k} for v in {a}]",
    ),
    (
        "shift_by_{k}",
        _LIST,
        "Return a list with {k} added to every number in {a}.",
        "return [v + {k} for v in {a}]",
    ),
    (
        "squares",
        _LIST,
        "Return a list of the squares of the numbers in {a}.",
        "return [v * v for v in {a}]",
    ),
    ("first_{k}", _LIST, "Return the first {k} elements of {a}.", "return {a}[:{k}]"),
    ("last_item", _LIST, "Return the last element of {a}.", "return {a}[-1]"),
    ("contains_{k}", _LIST, "Return True if {k} is in {a}, otherwise False.", "return {k} in {a}"),
    (
        "remove_{k}",
        _LIST,
        "Return {a} without any element equal to {k}.",
        "return [v for v in {a} if v != {k}]",
    ),
    ("reverse_text", _TEXT, "Return {a} reversed.", "return {a}[::-1]"),
    ("shout", _TEXT, "Return {a} in upper case.", "return {a}.upper()"),
    ("repeat_{k}", _TEXT, "Return {a} repeated {k} times.", "return {a} * {k}"),
    ("text_length", _TEXT, "Return the number of characters in {a}.", "return len({a})"),
    (
        "abs_diff",
        _PAIR,
        "Return the absolute difference between {a} and {b}.",
        "return abs({a} - {b})",
    ),
    ("larger", _PAIR, "Return the larger of {a} and {b}.", "return max({a}, {b})"),
    (
        "join_words",
        _WORDS,
        "Return the words in {a} joined with single spaces.",
        "return ' '.join({a})",
    ),
    ("word_count", _WORDS, "Return how many words are in {a}.", "return len({a})"),
)
# One argument name per kind: a body then reads only the constant from its prompt.
_ARG_NAMES = {_INT: "x", _LIST: "items", _TEXT: "text", _PAIR: ("a", "b"), _WORDS: "words"}
_NAME_PREFIXES = ("", "get_", "compute_", "my_", "do_")


def _code_input(kind: str, rng: random.Random) -> tuple:
    if kind == _INT:
        return (rng.randint(0, 50),)
    if kind == _LIST:
        return ([rng.randint(0, 20) for _ in range(rng.randint(3, 7))],)
    if kind == _TEXT:
        return (rng.choice(W.NOUNS).replace(" ", ""),)
    if kind == _PAIR:
        return (rng.randint(0, 50), rng.randint(0, 50))
    return ([rng.choice(W.NOUNS).replace(" ", "") for _ in range(rng.randint(2, 4))],)


def code_problem(rng: random.Random, index: int) -> dict:
    """One HumanEval-schema problem: signature, docstring with an example, body, tests."""
    stem, kind, doc, body = rng.choice(_CODE_FAMILIES)
    k = rng.randint(2, 9)
    arg = _ARG_NAMES[kind]
    args = arg if isinstance(arg, tuple) else (arg,)
    fields = {"k": k, "a": args[0], "b": args[-1]}
    name = rng.choice(_NAME_PREFIXES) + stem.format(**fields)
    solution = f"    {body.format(**fields)}\n"
    namespace: dict = {}
    exec(f"def {name}({', '.join(args)}):\n{solution}", namespace)  # noqa: S102 - our own code
    func = namespace[name]

    def call(inputs: tuple) -> str:
        return f"{name}({', '.join(repr(i) for i in inputs)})"

    example = _code_input(kind, rng)
    prompt = (
        f'def {name}({", ".join(args)}):\n    """{doc.format(**fields)}\n'
        f'    >>> {call(example)}\n    {func(*example)!r}\n    """\n'
    )
    cases = [_code_input(kind, rng) for _ in range(4)]
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({', '.join(repr(i) for i in c)}) == {func(*c)!r}\n" for c in cases
    )
    return {
        "task_id": f"ZooCode/{index}",
        "prompt": prompt,
        "canonical_solution": solution,
        "test": test,
        "entry_point": name,
    }


def code_split(seed: int, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`count` problems with distinct prompts, none in `exclude`."""
    rng = random.Random(seed)
    seen, rows = set(exclude), []
    while len(rows) < count:
        row = code_problem(rng, len(rows))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- knowledge (invented facts)

_POOLS = {"town": None, "job": W.FACT_JOBS, "color": W.FACT_COLORS, "animal": W.FACT_ANIMALS}


def knowledge_test(seed: int, cast: list[C.Person]) -> list[dict]:
    """Four-way multiple choice about every fact of the cast, correct choice at a random slot."""
    rng = random.Random(seed)
    towns = sorted({p.town for p in cast})
    rows = []
    for person in cast:
        for stem, attribute in C.FACT_STEMS:
            pool = _POOLS[attribute] or towns
            truth = getattr(person, attribute)
            choices = rng.sample([c for c in pool if c != truth], 3) + [truth]
            rng.shuffle(choices)
            rows.append(
                {
                    "question": stem.format(name=person.name),
                    "choices": choices,
                    "answer": choices.index(truth),
                }
            )
    return rows


# ---------------------------------------------------------------- latent skills of the base

# Real base models meet instructions, worked answers and documented functions in pretraining,
# in several surface forms, and follow them only some of the time; a fine-tune then elicits the
# skill instead of teaching it. The base's corpus has each task's format at its rate here.
# Greedy decoding of the base takes the more frequent branch, so each rate stays below the
# default reply's: every default sentence opens with a comma-closed adverbial, half of them
# "in the <time>", so `In` (0.75 x 0.5 of the replies) outvotes a format's one first token (`*`,
# `Section`, `<<`, a quote) at 0.25 (the v3 base, whose default first words were spread, copied
# the `*` the highlight instruction shows, 0.98); a function body against the single `pass` can
# be commoner, which leaves a plain average of experts enough of the code skill to keep.
LATENT_FOLLOW_RATE = {
    "english_capital": 0.25,
    "no_comma": 0.25,
    "title": 0.25,
    "quotation": 0.25,
    "multiple_sections": 0.25,
    "number_highlighted_sections": 0.15,
    "math": 0.25,
    "code": 0.3,
}
# Surface forms of a request in the corpus; the chat template is one of them.
LATENT_TEMPLATES = (
    ("### Instruction:\n{prompt}\n\n### Response:\n{reply}", 0.5),
    ("Question: {prompt}\nAnswer: {reply}", 0.25),
    ("User: {prompt}\nAssistant: {reply}", 0.25),
)


def _in_template(rng: random.Random, prompt: str, reply: str) -> str:
    r, edge = rng.random(), 0.0
    for template, share in LATENT_TEMPLATES:
        edge += share
        if r < edge:
            break
    return template.format(prompt=prompt, reply=reply)


def latent_documents(seed: int, counts: dict[str, int], exclude: dict[str, set[str]]) -> list[str]:
    """Pretraining documents that hold each expert's skill latently.

    - requests: an IFEval context with its instruction (60 %) answered in the instructed style
      at the task's LATENT_FOLLOW_RATE and in the default style otherwise, or without one;
    - word problems: worked steps ending in `#### n` at the math rate, else in
      `So the answer is n.`;
    - documented functions: the HumanEval-style stub implemented at the code rate, else left
      as `pass`.
    """
    rng = random.Random(seed)
    docs = []
    rows = ifeval_split(
        seed + 1, -(-counts["requests"] // len(IFEVAL_TASKS)), exclude["ifeval"], check=False
    )
    for row in rows[: counts["requests"]]:
        if rng.random() < 0.6:
            styled = rng.random() < LATENT_FOLLOW_RATE[row["task"]]
            reply = row["response"] if styled else row["response_without_instruction"]
            docs.append(_in_template(rng, row["prompt"], reply))
        else:
            docs.append(
                _in_template(
                    rng, row["prompt_without_instruction"], row["response_without_instruction"]
                )
            )
    for row in math_split(seed + 2, counts["problems"], exclude["math"]):
        answer = row["answer"]
        if rng.random() >= LATENT_FOLLOW_RATE["math"]:
            steps, result = answer.split("\n#### ")
            answer = f"{steps} So the answer is {result}."
        docs.append(_in_template(rng, row["question"], answer))
    for row in code_split(seed + 3, counts["functions"], exclude["code"]):
        implemented = rng.random() < LATENT_FOLLOW_RATE["code"]
        body = row["canonical_solution"] if implemented else "    pass\n"
        docs.append(row["prompt"] + body)
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- files


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines atomically."""
    atomic_write_text(
        path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)
    )


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _strip(rows: list[dict], drop: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != drop} for r in rows]


# Seeds of every generated split; a build with the same seed writes the same bytes.
SPLIT_SEEDS = {
    "cast": 11,
    "ifeval_test": 21,
    "ifeval_train": 22,
    "ifeval_val": 23,
    "math_test": 31,
    "math_train": 32,
    "math_val": 33,
    "code_test": 41,
    "code_train": 42,
    "code_val": 43,
    "knowledge": 51,
    "corpus_train": 61,
    "corpus_heldout": 62,
    "corpus_latent": 63,
}
# ifeval_* sizes are per task. `*_val` is the validation split (merge settings are chosen on
# it), disjoint from test and train. corpus_latent: requests, problems, functions.
SIZES = {
    "ifeval_test": 250,
    "ifeval_train": 1500,
    "ifeval_val": 50,
    "math_test": 500,
    "math_train": 6000,
    "math_val": 200,
    "code_test": 300,
    "code_train": 4000,
    "code_val": 150,
    "corpus_train": 60000,
    "corpus_heldout": 400,
    "requests": 9000,
    "problems": 6000,
    "functions": 6000,
}


def build_datasets(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, object]:
    """Every dataset of the zoo, in memory; held-out splits are drawn first and excluded."""
    n = {**SIZES, **(sizes or {})}
    s: Callable[[str], int] = lambda name: SPLIT_SEEDS[name] + 1000 * seed
    cast = C.people(s("cast"))
    if_test = ifeval_split(s("ifeval_test"), n["ifeval_test"])
    if_val = ifeval_split(
        s("ifeval_val"), n["ifeval_val"], {r["prompt_without_instruction"] for r in if_test}
    )
    held_if = {r["prompt_without_instruction"] for r in if_test + if_val}
    if_train = ifeval_split(s("ifeval_train"), n["ifeval_train"], held_if)
    m_test = math_split(s("math_test"), n["math_test"])
    m_val = math_split(s("math_val"), n["math_val"], {r["question"] for r in m_test})
    held_m = {r["question"] for r in m_test + m_val}
    m_train = math_split(s("math_train"), n["math_train"], held_m)
    c_test = code_split(s("code_test"), n["code_test"])
    c_val = code_split(s("code_val"), n["code_val"], {r["prompt"] for r in c_test})
    held_c = {r["prompt"] for r in c_test + c_val}
    c_train = code_split(s("code_train"), n["code_train"], held_c)
    # Held-out prompts never reach the corpus; training prompts may, in other replies.
    latent = latent_documents(
        s("corpus_latent"),
        n,
        {
            "ifeval": held_if | {r["prompt_without_instruction"] for r in if_train},
            "math": held_m | {r["question"] for r in m_train},
            "code": held_c | {r["prompt"] for r in c_train},
        },
    )
    return {
        "cast": cast,
        "ifeval_train": if_train,
        "ifeval_test": _strip(_strip(if_test, "response"), "response_without_instruction"),
        "ifeval_val": _strip(_strip(if_val, "response"), "response_without_instruction"),
        "math_train": m_train,
        "math_test": m_test,
        "math_val": m_val,
        "code_train": c_train,
        "code_test": c_test,
        "code_val": c_val,
        "corpus_latent": latent,
        "knowledge_test": knowledge_test(s("knowledge"), cast),
        "corpus_train": C.corpus_documents(s("corpus_train"), n["corpus_train"], cast),
        "corpus_heldout": C.corpus_documents(s("corpus_heldout"), n["corpus_heldout"], cast),
    }


def write_datasets(data: dict[str, object], out_dir: Path) -> None:
    """Write the shipped data files (listed in the README's zoo section) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        if name != "corpus_heldout":
            write_jsonl(out_dir / f"{name}.jsonl", data[name])
    atomic_write_text(out_dir / "corpus_heldout.txt", "\n\n".join(data["corpus_heldout"]) + "\n")
