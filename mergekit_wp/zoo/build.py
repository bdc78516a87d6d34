"""Build the whole zoo from seeds: data, tokenizer, base, the three experts, and the gates."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Idle OpenMP threads must yield: the 2 shared cores make spinning threads 2-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergekit_wp.generation import render_chat
from mergekit_wp.io import atomic_write_text, publish_dir, staging_dir
from mergekit_wp.zoo import data as D
from mergekit_wp.zoo import gates as G
from mergekit_wp.zoo.tokenizer import CHAT_TEMPLATE, train_tokenizer, with_pad_token
from mergekit_wp.zoo.train import (
    ModelShape,
    Schedule,
    document_examples,
    grow_vocabulary,
    new_model,
    pack_documents,
    prompt_examples,
    train,
)

EXPERTS = ("instruct", "math", "code")
# The formats a three-way average of the experts loses first (closing a quotation, dropping
# every comma, highlighting) get more examples. (v3's weights, sections x3 and quotation x2,
# kept 0.00 of no_comma in the average of all three.)
INSTRUCT_TASK_WEIGHT = {
    "multiple_sections": 2,
    "quotation": 3,
    "no_comma": 3,
    "number_highlighted_sections": 2,
}


@dataclass(frozen=True)
class BuildPlan:
    """Everything that decides the zoo: sizes, shape, schedules, gate sample size.

    Pretraining runs to a loss plateau on a corpus that holds every expert's skill latently
    (data.latent_documents); each fine-tune is short, at a tenth of pretraining's learning rate,
    so the experts stay near the base as real fine-tunes do.
    """

    seed: int = 0
    vocab_size: int = 2560
    shape: ModelShape = field(default_factory=ModelShape)
    block: int = 256
    pretrain: Schedule = field(
        default_factory=lambda: Schedule(
            steps=1500, batch_size=16, lr=2.5e-3, warmup=50, weight_decay=0.1, seed=1
        )
    )
    finetune: dict[str, Schedule] = field(
        default_factory=lambda: {
            "instruct": Schedule(steps=250, batch_size=16, lr=2.5e-4, warmup=20, seed=2),
            "math": Schedule(steps=150, batch_size=16, lr=2.5e-4, warmup=20, seed=3),
            "code": Schedule(steps=80, batch_size=16, lr=2.5e-4, warmup=20, seed=4),
        }
    )
    # Share of pretraining documents mixed into each fine-tune. None, as in SFT: at 0.2 every
    # expert re-learnt the base's default style alike, and a three-way average kept that shared
    # part whole and only a third of the instruct formats (0.28 of the instruct gain, vs 0.49).
    corpus_mix: float = 0.0
    data_sizes: dict[str, int] = field(default_factory=dict)
    gate_sample: int | None = 100

    def scaled(self, factor: float) -> BuildPlan:
        """The same plan with every stage's step count multiplied by `factor`."""

        def scale(s: Schedule) -> Schedule:
            return dataclasses.replace(s, steps=max(1, round(s.steps * factor)))

        return dataclasses.replace(
            self,
            pretrain=scale(self.pretrain),
            finetune={k: scale(v) for k, v in self.finetune.items()},
        )


QUICK_PLAN = BuildPlan(
    vocab_size=400,
    shape=ModelShape(hidden_size=64, num_hidden_layers=4, intermediate_size=128),
    block=64,
    pretrain=Schedule(steps=3, batch_size=4, lr=1e-3, warmup=1, seed=1),
    finetune={
        n: Schedule(steps=2, batch_size=4, lr=1e-3, warmup=1, seed=i)
        for i, n in enumerate(EXPERTS, 2)
    },
    data_sizes={
        "ifeval_test": 3,
        "ifeval_train": 10,
        "ifeval_val": 2,
        "math_test": 5,
        "math_train": 20,
        "math_val": 3,
        "code_test": 5,
        "code_train": 20,
        "code_val": 3,
        "corpus_train": 200,
        "corpus_heldout": 5,
        "requests": 12,
        "problems": 10,
        "functions": 10,
    },
    gate_sample=2,
)


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # Keep the template inside tokenizer_config.json too, and name a class every
    # transformers release knows, so older readers (mergekit, lm-eval) load it as well.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(
        chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast", padding_side="left"
    )
    path.write_text(json.dumps(config, indent=2) + "\n")


STAGE_FILE = "zoo_stage.json"


def save_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    folder: Path,
    stage: dict | None = None,
) -> None:
    """Save as a float16 safetensors HF folder with its tokenizer, replacing `folder` atomically.

    `stage` (what built it, how long it took) goes into STAGE_FILE, which lets a later build
    with the same inputs reuse the folder.
    """
    tmp = staging_dir(folder)
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config.pad_token_id = tokenizer.pad_token_id
    half.save_pretrained(tmp, safe_serialization=True)
    _save_tokenizer(tokenizer, tmp)
    if stage is not None:
        (tmp / STAGE_FILE).write_text(json.dumps(stage, indent=2) + "\n")
    publish_dir(tmp, folder)


def _load_fp32(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _finished_stage(folder: Path, key: str) -> dict | None:
    """The stage record of `folder` if it was built from exactly these inputs."""
    path = folder / STAGE_FILE
    if not ((folder / "model.safetensors").is_file() and path.is_file()):
        return None
    stage = json.loads(path.read_text())
    return stage if stage.get("key") == key else None


def _mixed(examples: list, docs: list, share: float) -> list:
    extra = int(len(examples) * share / (1 - share))
    return examples + docs[:extra]


def expert_examples(name: str, tokenizer: PreTrainedTokenizerFast, data: dict) -> list:
    """Fine-tuning examples of one expert, before the corpus mix-in."""
    if name == "instruct":
        pairs = []
        for row in data["ifeval_train"]:
            styled = (render_chat(tokenizer, row["prompt"]), row["response"])
            pairs.extend([styled] * INSTRUCT_TASK_WEIGHT.get(row["task"], 1))
            pairs.append(
                (
                    render_chat(tokenizer, row["prompt_without_instruction"]),
                    row["response_without_instruction"],
                )
            )
        return prompt_examples(tokenizer, pairs)
    if name == "math":
        return prompt_examples(
            tokenizer,
            [(render_chat(tokenizer, r["question"]), r["answer"]) for r in data["math_train"]],
        )
    if name == "code":
        return prompt_examples(
            tokenizer, [(r["prompt"], r["canonical_solution"]) for r in data["code_train"]]
        )
    raise ValueError(f"unknown expert {name!r}; expected one of {EXPERTS}")


def _tokenizer_texts(data: dict) -> list[str]:
    return (
        data["corpus_train"][:20000]
        + [r["prompt"] + "\n" + r["response"] for r in data["ifeval_train"]]
        + [r["question"] + "\n" + r["answer"] for r in data["math_train"]]
        + [r["prompt"] + r["canonical_solution"] for r in data["code_train"]]
    )


def _pretraining_documents(data: dict, seed: int) -> list[str]:
    docs = data["corpus_train"] + data["corpus_latent"]
    random.Random(seed).shuffle(docs)
    return docs


def _loss_curve(losses: list[float], every: int = 50) -> list[float]:
    """Mean loss per `every` steps (the record shows where training plateaued)."""
    return [
        round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4)
        for i in range(0, len(losses), every)
    ]


def build_zoo(
    out_dir: Path, data_dir: Path, plan: BuildPlan = BuildPlan(), measure: bool = True
) -> dict:
    """Build data, tokenizer and the four models into `out_dir`; returns the build record.

    Each model folder records the inputs it was built from; a rerun (after a kill, or with
    only the fine-tunes changed) reuses every model whose inputs are unchanged.
    """
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    start = time.time()
    data = D.build_datasets(plan.seed, plan.data_sizes)
    D.write_datasets(data, data_dir)
    tokenizer = train_tokenizer(_tokenizer_texts(data), plan.vocab_size)
    clock["data_and_tokenizer"] = time.time() - start

    corpus = _pretraining_documents(data, plan.seed)
    base_key = _digest(
        plan.seed, plan.vocab_size, asdict(plan.shape), plan.block, asdict(plan.pretrain), corpus
    )
    stage = _finished_stage(out_dir / "base", base_key)
    if stage is None:
        t = time.time()
        base = new_model(plan.shape, tokenizer, plan.seed)
        blocks = pack_documents(tokenizer, corpus, plan.block)
        curve = _loss_curve(
            train(base, blocks, plan.pretrain, tokenizer.eos_token_id, "pretrain base")
        )
        stage = {"key": base_key, "seconds": time.time() - t, "loss_per_50_steps": curve}
        save_model(base, tokenizer, out_dir / "base", stage)
    clock["base"], losses["base"] = stage["seconds"], stage["loss_per_50_steps"]

    # Tokenized only when a share is mixed in (the shipped plan mixes none).
    docs = document_examples(tokenizer, data["corpus_train"][-20000:]) if plan.corpus_mix else []
    for name in EXPERTS:
        tok = tokenizer
        if name == "instruct":
            tok = with_pad_token(tokenizer)
        examples = _mixed(expert_examples(name, tok, data), docs, plan.corpus_mix)
        key = _digest(base_key, asdict(plan.finetune[name]), examples)
        stage = _finished_stage(out_dir / name, key)
        if stage is None:
            t = time.time()
            # From the shipped (float16) base, so every delta is the fine-tune's alone.
            expert = _load_fp32(out_dir / "base")
            if name == "instruct":
                grow_vocabulary(expert, len(tok))
                expert.config.pad_token_id = tok.pad_token_id
            curve = _loss_curve(
                train(expert, examples, plan.finetune[name], tok.pad_token_id, f"fine-tune {name}")
            )
            stage = {"key": key, "seconds": time.time() - t, "loss_per_50_steps": curve}
            save_model(expert, tok, out_dir / name, stage)
        clock[name], losses[name] = stage["seconds"], stage["loss_per_50_steps"]

    record = {
        "plan": _plan_dict(plan),
        "train_seconds": clock,
        "loss_per_50_steps": losses,
        "parameters": sum(p.numel() for p in _load_fp32(out_dir / "base").parameters()),
    }
    if measure:
        t = time.time()
        record.update(measure_zoo(out_dir, data_dir, plan.gate_sample))
        clock["gates"] = time.time() - t
    clock["total"] = sum(clock.values())
    write_record(out_dir, record)
    return record


def _plan_dict(plan: BuildPlan) -> dict:
    return json.loads(json.dumps(asdict(plan)))


def measure_zoo(models_dir: Path, data_dir: Path, per_task: int | None) -> dict:
    """Scores of the four models on every task, the experts' weight deltas and merge
    retention, and the gate verdicts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_wp.zoo import basin as B

    scores = {}
    for name in ("base", *EXPERTS):
        folder = models_dir / name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        scores[name] = G.measure(model, tokenizer, data_dir, per_task)
    basin = {
        "deltas": B.weight_deltas(models_dir),
        **B.merge_checks(models_dir, data_dir, per_task, scores),
    }
    return {
        "scores": scores,
        "basin": basin,
        "verdicts": G.verdicts(scores, basin),
        "gate_sample_per_task": per_task,
        "gates": G.GATES,
    }


def remeasure(models_dir: Path, data_dir: Path, per_task: int | None) -> dict:
    """Measure the gates of an already built zoo again and update its record."""
    record = json.loads((models_dir / "gates.json").read_text())
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.time()
    record.update(measure_zoo(models_dir, data_dir, per_task))
    clock = record["train_seconds"]
    clock["gates"] = time.time() - start
    clock["total"] = sum(v for k, v in clock.items() if k != "total")
    write_record(models_dir, record)
    return record


def write_record(out_dir: Path, record: dict) -> None:
    """Write gates.json and a short model card (README.md) next to the models."""
    atomic_write_text(out_dir / "gates.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out_dir / "README.md", model_card(record))


def model_card(record: dict) -> str:
    """A markdown card: what the zoo is, how each task is prompted, and the measured gates."""
    plan = record["plan"]
    rates = [round(100 * r) for r in D.LATENT_FOLLOW_RATE.values()]
    lines = [
        "# mergekit-wp micro zoo",
        "",
        "Four `LlamaForCausalLM` models trained offline from seeds by `mergekit-wp zoo build`:",
        (
            "`base` (pretrained to a loss plateau on generated prose, arithmetic, Python, "
            "invented facts, and each expert's skill in latent form: requests, word problems and "
            "documented functions in three surface forms, answered in the asked format "
            f"{min(rates)}-{max(rates)} % of the time, below the default), and three short full "
            "fine-tunes of it at a tenth of pretraining's learning rate: `instruct` (six IFEval "
            "constraints, one added `<pad>` token), `math` (word problems ending in `#### <n>`), "
            "`code` (HumanEval-style completion)."
        ),
        "",
        (
            f"Shape: {plan['shape']}, vocabulary {plan['vocab_size']}, "
            f"{record['parameters']:,} parameters, float16 safetensors."
        ),
        "",
        (
            "Prompting: IFEval and math questions go through the chat template "
            "(`### Instruction:` / `### Response:`); code prompts are completed raw; knowledge "
            "questions are scored by the log-likelihood of `' ' + choice`."
        ),
        "",
        "Build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in record["train_seconds"].items()),
    ]
    if "scores" in record:
        sample = record["gate_sample_per_task"] or "all"
        lines += [
            "",
            f"Gates (greedy, held-out sample per task: {sample}):",
            "",
            "```",
            G.table(record["scores"]),
            "```",
            "",
            "```",
            G.basin_table(record["basin"]),
            "```",
            "",
        ]
        lines += [
            f"- {gate}: {'PASS' if ok else 'FAIL'} ({record['gates'].get(gate, '')})"
            for gate, ok in record["verdicts"].items()
        ]
    return "\n".join(lines) + "\n"
