"""The Table-3 layout: per-task scores, each method's delta against Avg, the average column;
the best merge per column marked; where our methods rank against the best baseline."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from mergekit_wp.io import atomic_write_bytes, atomic_write_text

METHOD_LABELS = {
    "linear": "Avg",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "dare_linear": "DARE-TA",
    "dare_ties": "DARE-TIES",
    "breadcrumbs": "Breadcrumbs",
    "breadcrumbs_ties": "Breadcrumbs-TIES",
    "della": "DELLA",
    "della_linear": "DELLA-TA",
    "sce": "SCE",
    "model_stock": "Model Stock",
    "karcher": "Karcher",
    "nuslerp": "NuSLERP",
    "widen": "WIDEN",
    "wp_attr": "WP (WP-attr)",
    "wp": "WP (exact)",
}
EXPERT_LABELS = {"base": "Base", "code": "Code", "instruction": "Instruction", "math": "Math"}


def combination_label(combination: str) -> str:
    """`code+instruction` -> `Code + Instruction`."""
    return " + ".join(EXPERT_LABELS.get(p, p) for p in combination.split("+"))


def method_label(method: str | None) -> str:
    return METHOD_LABELS.get(method, method) if method else "-"


@dataclass(frozen=True)
class Row:
    """One line: a reference model (method None), a merge, or a merge that could not run."""

    combination: str  # "code+math"; for references the model's name ("base", "code", ...)
    method: str | None
    scores: dict[str, float] | None  # percent, per suite column; None: not merged (see note)
    setting: str = ""  # the knobs chosen on validation ("" : the recipe's own)
    validation: float | None = None  # the chosen setting's validation average
    note: str = ""  # why a method has no scores here

    @property
    def average(self) -> float:
        # Rounded far below any score's resolution, so that equal results summed in another
        # order (71.35416666666667 vs ...666) tie in ranks, margins and wins.
        return round(sum(self.scores.values()) / len(self.scores), 9)


@dataclass(frozen=True)
class Standing:
    """One of our methods in one combination, against the strongest baseline there."""

    combination: str
    method: str
    average: float
    rank: int  # 1 = the best merge of the combination
    merges: int  # merges with scores in the combination
    best_baseline: Row

    @property
    def margin(self) -> float:
        return self.average - self.best_baseline.average


@dataclass(frozen=True)
class Table:
    """Rows in display order, the suite's columns, the method deltas are taken against, and
    which methods are ours (ranked against the others, the baselines)."""

    columns: list[str]
    references: list[Row]
    merges: list[Row]
    baseline: str = "linear"
    ours: tuple[str, ...] = ("wp_attr", "wp")

    def scored(self, combination: str) -> list[Row]:
        return [r for r in self.merges if r.combination == combination and r.scores is not None]

    @property
    def combinations(self) -> list[str]:
        return list(dict.fromkeys(r.combination for r in self.merges))

    def baseline_of(self, row: Row) -> Row | None:
        return next((r for r in self.scored(row.combination) if r.method == self.baseline), None)

    def deltas(self, row: Row) -> dict[str, float] | None:
        """Score minus the baseline's, per column and for "Avg"; None without a baseline row."""
        base = self.baseline_of(row)
        if base is None or row.method is None or row.scores is None:
            return None
        out = {c: row.scores[c] - base.scores[c] for c in self.columns}
        out["Avg"] = row.average - base.average
        return out

    def best(self, combination: str) -> dict[str, float]:
        """The best merge score per column (and "Avg") in a combination; a column where every
        merge scores the same has no best (inf)."""
        rows = self.scored(combination)
        values = {c: [r.scores[c] for r in rows] for c in self.columns}
        values["Avg"] = [r.average for r in rows]
        return {k: max(v) if len(set(v)) > 1 else float("inf") for k, v in values.items()}

    def standings(self) -> list[Standing]:
        """Each of our methods per combination: its rank by average, the best baseline's row."""
        out = []
        for combination in self.combinations:
            rows = self.scored(combination)
            baselines = [r for r in rows if r.method not in self.ours]
            if not baselines:
                continue
            best_baseline = max(baselines, key=lambda r: r.average)  # first of equals
            for row in rows:
                if row.method in self.ours:
                    rank = 1 + sum(other.average > row.average for other in rows)
                    out.append(
                        Standing(
                            combination, row.method, row.average, rank, len(rows), best_baseline
                        )
                    )
        return out


def _cell(value: float, delta: float | None, best: bool) -> str:
    text = f"{value:.2f}" if delta is None else f"{value:.2f} ({delta:+.2f})"
    return f"**{text}**" if best else text


def _merge_line(table: Table, row: Row, name: str, best: dict[str, float]) -> str:
    keys = [*table.columns, "Avg"]
    if row.scores is None:
        cells = ["n/a"] * len(keys)
        setting = row.note
    else:
        deltas = None if row.method == table.baseline else table.deltas(row)
        values = [*(row.scores[c] for c in table.columns), row.average]
        cells = [
            _cell(v, deltas[k] if deltas else None, v >= best[k]) for v, k in zip(values, keys)
        ]
        setting = row.setting or "-"
    return f"| {name} | {method_label(row.method)} | {setting} | " + " | ".join(cells) + " |"


def summary_markdown(table: Table) -> str:
    """Where each of our methods stands: rank and margin against the best baseline; wins."""
    standings = table.standings()
    if not standings:
        return ""
    lines = [
        "| Model(s) | Method | Avg. | Rank | Best baseline | its Avg. | Margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in standings:
        lines.append(
            f"| {combination_label(s.combination)} | {method_label(s.method)} | {s.average:.2f} | "
            f"{s.rank} of {s.merges} | {method_label(s.best_baseline.method)} | "
            f"{s.best_baseline.average:.2f} | {s.margin:+.2f} |"
        )
    lines.append("")
    for method in dict.fromkeys(s.method for s in standings):
        mine = [s for s in standings if s.method == method]
        wins = sum(s.margin > 0 for s in mine)
        ties = sum(s.margin == 0 for s in mine)
        versus = [(s, table.baseline_of(s.best_baseline)) for s in mine]
        versus = [(s, base) for s, base in versus if base is not None]
        beats_avg = sum(s.average > base.average for s, base in versus)
        lines.append(
            f"- {method_label(method)}: beats the best baseline in {wins} of {len(mine)} "
            f"combinations ({ties} tied), beats {method_label(table.baseline)} in {beats_avg} of "
            f"{len(versus)}; the best merge in {sum(s.rank == 1 for s in mine)}."
        )
    return "\n".join(lines) + "\n"


def to_markdown(table: Table) -> str:
    """Table 3 as markdown: `score (+delta)` against the baseline, the best per column in bold,
    each method's chosen setting; then where our methods stand."""
    header = ["Model(s)", "Method", "Setting", *table.columns, "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.references:
        cells = [f"{row.scores[c]:.2f}" for c in table.columns] + [f"{row.average:.2f}"]
        label = EXPERT_LABELS.get(row.combination, row.combination)
        lines.append(f"| {label} | - | - | " + " | ".join(cells) + " |")
    previous = None
    for row in table.merges:
        name = combination_label(row.combination) if row.combination != previous else ""
        previous = row.combination
        lines.append(_merge_line(table, row, name, table.best(row.combination)))
    summary = summary_markdown(table)
    return "\n".join(lines) + "\n" + (f"\n{summary}" if summary else "")


def to_csv(table: Table) -> str:
    """One row per model: setting, scores, deltas against the baseline, validation average,
    rank among the combination's merges, and why a method did not run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [*table.columns, "Avg"]
    writer.writerow(
        [
            "combination",
            "method",
            "setting",
            *keys,
            *(f"{k} delta" for k in keys),
            "validation Avg",
            "rank",
            "note",
        ]
    )
    for row in table.references:
        values = [*(row.scores[c] for c in table.columns), row.average]
        writer.writerow([row.combination, "", "", *values, *([""] * len(keys)), "", "", ""])
    for row in table.merges:
        if row.scores is None:
            writer.writerow(
                [row.combination, row.method, "", *([""] * 2 * len(keys)), "", "", row.note]
            )
            continue
        deltas = table.deltas(row)
        values = [*(row.scores[c] for c in table.columns), row.average]
        rank = 1 + sum(o.average > row.average for o in table.scored(row.combination))
        writer.writerow(
            [
                row.combination,
                row.method,
                row.setting,
                *values,
                *((deltas[k] for k in keys) if deltas else [""] * len(keys)),
                "" if row.validation is None else row.validation,
                rank,
                "",
            ]
        )
    return buffer.getvalue()


def to_png(table: Table) -> bytes:
    """Grouped bars: one panel per combination, tasks (and Avg) on x, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combinations = table.combinations
    methods = list(dict.fromkeys(r.method for r in table.merges if r.scores is not None))
    colors = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    keys = [*table.columns, "Avg"]
    cols = min(2, len(combinations)) or 1
    rows = (len(combinations) + cols - 1) // cols or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(7.5 * cols, 3.8 * rows), squeeze=False, sharey=True
    )
    scored = [r for c in combinations for r in table.scored(c)]
    top = max([5.0] + [v for r in scored for v in [*r.scores.values(), r.average]])
    width = 0.8 / max(1, len(methods))
    for ax, combination in zip(axes.flat, combinations):
        for i, method in enumerate(methods):
            row = next((r for r in table.scored(combination) if r.method == method), None)
            if row is None:
                continue
            values = [*(row.scores[c] for c in table.columns), row.average]
            xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, values, width, label=method_label(method), color=colors(i))
        ax.set_title(combination_label(combination))
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, top * 1.1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(combinations) :]:
        ax.axis("off")
    labels = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    legend_rows = (len(labels) + 7) // 8
    fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * legend_rows, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_table(table: Table, out_dir: str | Path) -> dict[str, Path]:
    """table.md, table.csv and table.png in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    return {
        "markdown": atomic_write_text(out_dir / "table.md", to_markdown(table)),
        "csv": atomic_write_text(out_dir / "table.csv", to_csv(table)),
        "png": atomic_write_bytes(out_dir / "table.png", to_png(table)),
    }
