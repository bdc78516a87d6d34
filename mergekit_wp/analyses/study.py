"""The shared state of one analysis run: models, data, anchors, score maps and behaviour, each
made once.

Every analysis asks the study; the study asks the scoring package (anchors, WP / WP-attr / AP
scores, restore / ablate). Score maps and anchors are cached on disk under
`<output>/cache/<fingerprint>/`, so a second run with the same inputs reuses them.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mergekit_wp.analyses import scoring_api as api
from mergekit_wp.analyses.config import AnalysisConfig, Tasks
from mergekit_wp.analyses.ranking import Kind, Region, layer_mask
from mergekit_wp.components import Component, TensorGroupName, load_shape
from mergekit_wp.config import replace
from mergekit_wp.generation import shared_tokenizer
from mergekit_wp.io import load_model, reference_fingerprint, resolve_model
from mergekit_wp.scoremap import ScoreMap, read_score_map, write_score_map
from mergekit_wp.scoring.anchor import Anchor, fit_anchor, load_anchor, save_anchor
from mergekit_wp.scoring.data import PairedExample, load_paired, resolve_source, split_paired
from mergekit_wp.scoring.engine import ModelPair


def _fingerprint(config: AnalysisConfig) -> str:
    """Cached anchors and maps are only reused by runs with the same inputs to them."""
    keys = (
        config.base,
        config.instruct,
        config.scoring_data,
        config.examples,
        config.seed,
        config.dtype,
        config.max_new_tokens,
        config.anchor.layer,
        config.anchor.sweep_layers,
        config.anchor.sweep_examples,
        config.anchor.mode,
        sorted((task, reference_fingerprint(path)) for task, path in config.anchor.files.items()),
        [reference_fingerprint(resolve_model(m)) for m in (config.base, config.instruct)],
        reference_fingerprint(resolve_source(config.scoring_data)),
    )
    return hashlib.sha256(repr(keys).encode()).hexdigest()[:12]


@torch.no_grad()
def null_instruct(base: nn.Module, instruct: nn.Module, seed: int) -> nn.Module:
    """The base plus, in every tensor, Gaussian noise with the norm of the instruct model's change.

    A control pair for the analyses: same base, same per-tensor change budget, no learned structure.
    Rows the instruct model adds (an extra token) are not part of the base and are left out.
    """
    null = copy.deepcopy(base)
    tuned = dict(instruct.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    for name, weight in null.named_parameters():
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        delta = tuned[name][tuple(slice(0, n) for n in weight.shape)].to(accumulate) - weight.to(
            accumulate
        )
        noise = torch.randn(weight.shape, generator=generator, dtype=accumulate)
        weight += (noise * (delta.norm() / noise.norm().clamp_min(1e-30))).to(weight.dtype)
    return null


class Study:
    """Lazily computed, cached inputs of the analyses for one base/instruct pair."""

    def __init__(
        self,
        config: AnalysisConfig,
        base: nn.Module | None = None,
        instruct: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.config = config
        load = lambda name: load_model(
            name,
            config.dtype,
            config.device,  # the family's attention
            load_shape(resolve_model(name)).family.attn_implementation,
        )
        self.pair = ModelPair.of(
            base if base is not None else load(config.base),
            instruct if instruct is not None else load(config.instruct),
            config.base,
            config.instruct,
            "the analyses compare two checkpoints of one architecture",
        )
        self.base, self.instruct, self.shape = self.pair.base, self.pair.model, self.pair.shape
        # The instruct model's tokenizer (its chat template), as `mergekit-wp score` reads x.
        self.tokenizer = tokenizer or shared_tokenizer(
            AutoTokenizer.from_pretrained(resolve_model(config.instruct)), self.base
        )
        self.tasks = list(config.tasks)
        self.seed = config.seed
        self.cache = Path(config.output) / "cache" / _fingerprint(config)
        self._anchors: dict[str, Anchor] = {}
        self._scores: dict[tuple[str, str, str], ScoreMap] = {}
        self._accuracy: dict[tuple[str, str], float] = {}
        self._patched: dict[tuple[str, str, frozenset, frozenset], float] = {}
        self._batches: dict[tuple[str, str], list] = {}
        self._utilities: dict[tuple[str, str], Any] = {}
        self._links: dict[tuple[str, Component], dict[str, torch.Tensor]] = {}
        self._examples: dict[str, list[PairedExample]] | None = None
        self._evaluation: dict[str, list[PairedExample]] | None = None
        self._null: Study | None = None

    # --- data ---------------------------------------------------------------------------
    @property
    def heads_shape(self) -> tuple[int, int]:
        return self.shape.num_hidden_layers, self.shape.num_attention_heads

    @property
    def neurons_shape(self) -> tuple[int, int]:
        return self.shape.num_hidden_layers, self.shape.intermediate_size

    def tasks_for(self, tasks: Tasks) -> list[str]:
        """The tasks an analysis runs on: `tasks: main` (the main task) or `all`."""
        return [self.config.main_task] if tasks == "main" else self.tasks

    def _split(self) -> None:
        rows = load_paired(self.config.scoring_data, self.tasks)
        extraction, held_out = split_paired(rows, self.seed)
        n = self.config.examples
        self._examples = {t: [e for e in extraction if e.task == t][:n] for t in self.tasks}
        self._sweep = {
            t: [e for e in held_out if e.task == t][: self.config.anchor.sweep_examples]
            for t in self.tasks
        }
        evaluation = load_paired(self.config.evaluation_data, self.tasks)
        m = self.config.eval_examples
        self._evaluation = {t: [e for e in evaluation if e.task == t][:m] for t in self.tasks}

    def score_examples(self, task: str) -> list[PairedExample]:
        """Scoring / task-vector examples of a task (from the scoring data's extraction half)."""
        if self._examples is None:
            self._split()
        return self._examples[task]

    def eval_examples(self, task: str) -> list[PairedExample]:
        """Held-out examples whose greedy responses are checked (the evaluation data)."""
        if self._evaluation is None:
            self._split()
        return self._evaluation[task]

    # --- anchors and regions ------------------------------------------------------------
    def anchor(self, task: str) -> Anchor:
        """The task's anchor: from its file, else cached, else fitted (fixed layer or sweep)."""
        if task in self._anchors:
            return self._anchors[task]
        settings = self.config.anchor
        path = (
            Path(settings.files[task])
            if task in settings.files
            else self.cache / f"anchor-{task}.safetensors"
        )
        if path.is_file():
            anchor = load_anchor(path)
        else:
            self.score_examples(task)
            anchor = fit_anchor(
                self.base,
                self.instruct,
                self.tokenizer,
                self._examples[task],
                self._sweep[task],
                layers=settings.sweep_layers,
                fixed_layer=settings.layer,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                mode=settings.mode,
                task=task,
            )
            save_anchor(path, anchor)
        self._anchors[task] = anchor
        return anchor

    def anchor_layers(self) -> dict[str, int]:
        """l_a of every task whose anchor has been made so far."""
        return {task: anchor.layer for task, anchor in self._anchors.items()}

    def anchor_layer(self, task: str | None = None) -> int:
        return self.anchor(task or self.config.main_task).layer

    def region_mask(self, kind: Kind, region: Region, task: str | None = None) -> torch.Tensor:
        """Bool `[L, units]` of the components upstream (<= l_a) or downstream of the task's
        anchor.
        """
        layers, units = self.heads_shape if kind == "head" else self.neurons_shape
        return layer_mask(
            layers, units, None if region == "all" else self.anchor_layer(task), region
        )

    # --- scores -------------------------------------------------------------------------
    def method_name(self, method: str, utility: str = "anchor") -> str:
        """`wp` / `ap` in an analysis mean the configured scorer (e.g. wp_attr, ap), per utility."""
        chosen = {"wp": self.config.scores.wp, "ap": self.config.scores.ap}.get(method, method)
        return chosen.get(utility, chosen.get("anchor")) if isinstance(chosen, dict) else chosen

    def scores(self, task: str, method: str, utility: str = "anchor") -> ScoreMap:
        """The score map of `task` under `method` (wp, ap, wp_attr, ...) and `utility`
        (anchor, kl).
        """
        method = self.method_name(method, utility)
        key = (task, method, utility)
        if key in self._scores:
            return self._scores[key]
        given = self.config.scores.files.get(f"{task}/{method}/{utility}")
        path = (
            Path(given) if given else self.cache / f"scores-{task}-{method}-{utility}.safetensors"
        )
        if path.is_file():
            scores = read_score_map(path, self.shape)
        else:
            scores = api.score(self, task, method, utility)
            write_score_map(path, scores)
        self._scores[key] = scores
        return scores

    def utility(self, task: str, name: str) -> Any:
        """The task's anchor utility F_a, or the KL utility against the instruct model."""
        if (task, name) not in self._utilities:
            self._utilities[(task, name)] = api.utility(self, task, name)
        return self._utilities[(task, name)]

    def batches(self, task: str, name: str) -> list:
        """The task's scoring batches for a utility, built once."""
        if (task, name) not in self._batches:
            self._batches[(task, name)] = api.batches(self, task, name)
        return self._batches[(task, name)]

    def remember(self, task: str, method: str, utility: str, scores: ScoreMap) -> None:
        """Keep a map computed elsewhere (e.g. timed by the fidelity analysis) for the others."""
        self._scores[(task, method, utility)] = scores
        write_score_map(self.cache / f"scores-{task}-{method}-{utility}.safetensors", scores)

    def downstream_scores(self, task: str, method: str = "wp") -> ScoreMap:
        """Scores of the components after the anchor, under the KL utility (docs/method.md §6)."""
        return self.scores(task, method, "kl")

    def region_scores(self, task: str, method: str, kind: Kind, region: Region) -> torch.Tensor:
        """`[L, units]`: upstream regions use the anchor utility, downstream ones the KL utility."""
        maps = (
            self.downstream_scores(task, method)
            if region == "downstream"
            else self.scores(task, method)
        )
        return maps.heads if kind == "head" else maps.neurons

    def links(
        self, task: str, targets: list[Component]
    ) -> dict[Component, dict[str, torch.Tensor]]:
        """E_link of every component to each target:
        `{target: {"heads": [L, H], "neurons": [L, I]}}`.
        """
        from mergekit_wp.analyses.links import link_strengths

        missing = [t for t in targets if (task, t) not in self._links]
        if missing:
            computed = link_strengths(
                self.base,
                self.instruct,
                self.batches(task, "anchor"),
                self.utility(task, "anchor"),
                missing,
            )
            self._links.update({(task, t): v for t, v in computed.items()})
        return {t: self._links[(task, t)] for t in targets}

    def exact_wp(self, task: str, components: list[Component]) -> dict[Component, float]:
        """Exact single-component E_w (anchor utility) of just these components."""
        # Reuse a full exact map when there is one: configured as "WP", or timed by fidelity.
        full = self._scores.get((task, "wp", "anchor"))
        if full is None and self.method_name("wp") == "wp":
            full = self.scores(task, "wp")
        if full is None:
            return api.exact_wp(self, task, components)
        return {
            c: float((full.heads if c.kind == "head" else full.neurons)[c.layer, c.index])
            for c in components
        }

    def null_control(self) -> Study:
        """The study of (base, `null_instruct`) with this study's anchors, built once."""
        if self._null is None:
            files = {}
            for task in self.tasks:
                self.anchor(task)
                files[task] = self.config.anchor.files.get(
                    task, str(self.cache / f"anchor-{task}.safetensors")
                )
            name = (
                f"null control (seed {self.seed}) of "
                f"{reference_fingerprint(resolve_model(self.config.instruct))}"
            )
            config = replace(
                self.config,
                instruct=name,
                anchor=replace(self.config.anchor, files=files),
                scores=replace(self.config.scores, files={}),  # given maps are the real pair's
            )
            self._null = Study(
                config,
                self.base,
                null_instruct(self.base, self.instruct, self.seed),
                self.tokenizer,
            )
        return self._null

    # --- behaviour ----------------------------------------------------------------------
    def accuracy(self, model: nn.Module, task: str, label: str | None = None) -> float:
        """IFEval strict accuracy of greedy responses to the task's evaluation prompts.

        With a `label` the value is cached (vanilla base / instruct); patched models pass none.
        """
        if label is not None and (label, task) in self._accuracy:
            return self._accuracy[(label, task)]
        value = api.ifeval_accuracy(self, model, task)
        if label is not None:
            self._accuracy[(label, task)] = value
        return value

    def base_accuracy(self, task: str) -> float:
        return self.accuracy(self.base, task, "base")

    def instruct_accuracy(self, task: str) -> float:
        return self.accuracy(self.instruct, task, "instruct")

    def restored(self, components: list[Component]) -> AbstractContextManager[None]:
        """The base model with the instruct model's slices of `components` (undone on exit)."""
        return api.restore(self.base, self.instruct, components)

    def ablated(self, components: list[Component]) -> AbstractContextManager[None]:
        """The instruct model with the base model's slices of `components` (undone on exit)."""
        return api.ablate(self.instruct, self.base, components)

    def swap_accuracy(
        self,
        task: str,
        mode: Literal["restore", "knockout"],
        components: list[Component],
        groups: tuple[TensorGroupName, ...] = (),
    ) -> float:
        """Accuracy after a swap of `components` and whole tensor `groups` (memoized: curves
        revisit sets).

        `restore`: the instruct model's values go into the base; `knockout`: the base's into the
        instruct.
        """
        key = (mode, task, frozenset(components), frozenset(groups))
        if key not in self._patched:
            target, source = {
                "restore": (self.base, self.instruct),
                "knockout": (self.instruct, self.base),
            }[mode]
            with (
                api.patched(target, source, components),
                api.patched_tensors(target, source, groups),
            ):
                self._patched[key] = self.accuracy(target, task)
        return self._patched[key]

    def restore_accuracy(self, task: str, components: list[Component]) -> float:
        """Accuracy of the base with `components` restored."""
        return self.swap_accuracy(task, "restore", components)

    def knockout_accuracy(self, task: str, components: list[Component]) -> float:
        """Accuracy of the instruct model with `components` knocked out."""
        return self.swap_accuracy(task, "knockout", components)
