"""Hierarchy recovery (docs/method.md §7): sources -> aggregation -> execution, as JSON and a
layered graph.

1. Aggregation candidates S_conv: the top AP heads (upstream, anchor utility).
2. Each target's suppliers: the top neurons (and optionally heads) of earlier layers by E_link.
3. Source validation: a supplier is a source when E_w > τ_w (exact WP) and E_link > τ_link.
4. Execution modules S_exe: the top components after the anchor under the KL utility.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import Kind, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report, write_json
from mergekit_wp.components import Component


def recover_circuit(
    targets: list[Component],
    links: dict[Component, dict[str, object]],
    exact_wp,  # callable(list[Component]) -> dict[Component, float]
    execution: list[Component],
    suppliers: int,
    supplier_kinds: tuple[str, ...],
    tau_w: float,
    tau_link: float,
    aggregation_scores: dict[Component, float],
    execution_scores: dict[Component, float],
) -> dict:
    """Nodes with roles and scores, and the validated supplier -> target edges."""
    from mergekit_wp.analyses.overlap import supplier_mask

    candidates: dict[tuple[Component, Component], float] = {}
    for target in targets:
        for kind in supplier_kinds:
            scores = links[target]["neurons" if kind == "neuron" else "heads"]
            layers, units = scores.shape
            pool = supplier_mask(target, layers, units)
            if kind == "head" and target.kind == "neuron":
                pool[target.layer] = True  # a neuron reads its own layer's attention output
            for sup in top_k(scores, suppliers, kind, pool):
                value = float(scores[sup.layer, sup.index])
                if value > tau_link:
                    candidates[(sup, target)] = value
    e_w = exact_wp(sorted({s for s, _ in candidates}, key=lambda c: (c.kind, c.layer, c.index)))
    edges = [
        {"source": str(s), "target": str(t), "e_link": v}
        for (s, t), v in sorted(candidates.items(), key=lambda kv: -kv[1])
        if e_w.get(s, float("-inf")) > tau_w
    ]
    nodes: dict[str, dict] = {}

    def node(c: Component, role: str, **scores: float) -> None:
        entry = nodes.setdefault(
            str(c),
            {
                "id": str(c),
                "kind": c.kind,
                "layer": c.layer,
                "index": c.index,
                "roles": [],
                "scores": {},
            },
        )
        if role not in entry["roles"]:
            entry["roles"].append(role)
        entry["scores"].update(scores)

    for t in targets:
        node(t, "aggregation", e_a=aggregation_scores[t])
    for s in {e["source"] for e in edges}:
        comp = next(c for c, _ in candidates if str(c) == s)
        node(comp, "source", e_w=e_w[comp])
    for c in execution:
        node(c, "execution", e_down=execution_scores[c])
    return {
        "nodes": list(nodes.values()),
        "edges": edges,
        "candidates": len({s for s, _ in candidates}),
        "validated_sources": len({e["source"] for e in edges}),
        "rejected_by_tau_w": sorted(
            str(s) for s in {s for s, _ in candidates} if e_w.get(s, float("-inf")) <= tau_w
        ),
    }


ROLE_COLOURS = {"source": "tab:red", "aggregation": "tab:blue", "execution": "tab:green"}


def plot_circuit(circuit: dict, anchor_layer: int, layers: int, max_edges: int) -> plt.Figure:
    """Layered graph: x = layer (heads at l, neurons at l + 0.5), nodes coloured by role."""
    columns: dict[tuple[int, str], list[dict]] = {}
    for n in circuit["nodes"]:
        columns.setdefault((n["layer"], n["kind"]), []).append(n)
    pos = {}
    for (layer, kind), members in columns.items():
        x = layer + (0.5 if kind == "neuron" else 0.0)
        for i, n in enumerate(sorted(members, key=lambda n: n["index"])):
            pos[n["id"]] = (x, i - (len(members) - 1) / 2)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * layers + 2), 5))
    edges = circuit["edges"][:max_edges]
    peak = max((e["e_link"] for e in edges), default=1.0) or 1.0
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.annotate(
            "",
            (x1, y1),
            (x0, y0),
            arrowprops={
                "arrowstyle": "->",
                "color": "grey",
                "alpha": 0.2 + 0.8 * e["e_link"] / peak,
                "lw": 0.8,
            },
        )
    for n in circuit["nodes"]:
        x, y = pos[n["id"]]
        colour = ROLE_COLOURS[n["roles"][0]]
        ax.scatter(
            [x],
            [y],
            s=60,
            color=colour,
            marker="o" if n["kind"] == "neuron" else "s",
            zorder=3,
            edgecolors="black" if len(n["roles"]) > 1 else colour,
        )
        ax.annotate(n["id"], (x, y), fontsize=5, xytext=(3, 3), textcoords="offset points")
    ax.axvline(anchor_layer + 0.75, color="black", ls="--", lw=0.8)
    ax.text(anchor_layer + 0.8, ax.get_ylim()[1], "anchor", fontsize=7, va="top")
    for role, colour in ROLE_COLOURS.items():
        ax.scatter([], [], color=colour, label=role)
    ax.set(
        xlabel="layer (squares: heads, circles: neurons)",
        yticks=[],
        title=f"recovered circuit ({len(edges)} of {len(circuit['edges'])} links drawn)",
    )
    ax.set_xlim(-0.5, layers)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    targets: int = 20
    suppliers: int = 200
    supplier_kinds: Sequence[Kind] = ("neuron",)
    tau_w: float = 0.0
    tau_link: float = 0.0
    execution_heads: int = 5
    execution_neurons: int = 20
    draw_edges: int = 60
    tasks: Tasks = "main"


def run(study, report: Report, options: Options) -> AnalysisResult:
    data: dict = {}
    figures = []
    for task in study.tasks_for(options.tasks):
        up = study.region_mask("head", "upstream", task)
        ap = study.scores(task, "ap").heads
        targets = top_k(ap, options.targets, "head", up)
        down = study.downstream_scores(task)
        execution = top_k(
            down.heads,
            options.execution_heads,
            "head",
            study.region_mask("head", "downstream", task),
        ) + top_k(
            down.neurons,
            options.execution_neurons,
            "neuron",
            study.region_mask("neuron", "downstream", task),
        )
        circuit = recover_circuit(
            targets,
            study.links(task, targets),
            lambda cs, t=task: study.exact_wp(t, cs),
            execution,
            options.suppliers,
            tuple(options.supplier_kinds),
            options.tau_w,
            options.tau_link,
            {t: float(ap[t.layer, t.index]) for t in targets},
            {
                c: float((down.heads if c.kind == "head" else down.neurons)[c.layer, c.index])
                for c in execution
            },
        )
        circuit.update(
            task=task,
            anchor_layer=study.anchor_layer(task),
            thresholds={"tau_w": options.tau_w, "tau_link": options.tau_link},
        )
        write_json(report.folder("hierarchy") / f"circuit_{task}.json", circuit)
        data[task] = {k: circuit[k] for k in ("candidates", "validated_sources", "anchor_layer")}
        data[task]["source_layers"] = sorted(
            {n["layer"] for n in circuit["nodes"] if "source" in n["roles"]}
        )
        data[task]["aggregation_layers"] = sorted({t.layer for t in targets})
        fig = plot_circuit(
            circuit, study.anchor_layer(task), study.shape.num_hidden_layers, options.draw_edges
        )
        figures.append(report.figure("hierarchy", fig, f"circuit_{task}"))
    summary = (
        "; ".join(
            f"{t}: {d['validated_sources']}/{d['candidates']} supplier candidates validated as "
            f"sources (layers {d['source_layers']}), aggregation heads in layers "
            f"{d['aggregation_layers']}, anchor {d['anchor_layer']}"
            for t, d in data.items()
        )
        + ". Circuits: hierarchy/circuit_<task>.json."
    )
    return AnalysisResult("hierarchy", "Hierarchy recovery (§7)", data, figures, summary)
