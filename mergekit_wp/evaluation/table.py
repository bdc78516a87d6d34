"""The Table-3 layout: per-task scores, each method's delta against Avg, the average column."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from mergekit_wp.evaluation.io import atomic_write_bytes, atomic_write_text

METHOD_LABELS = {
    "linear": "Avg",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "dare_linear": "DARE-TA",
    "dare_ties": "DARE-TIES",
    "wp_attr": "WP (WP-attr)",
    "wp": "WP (exact)",
}
EXPERT_LABELS = {"base": "Base", "code": "Code", "instruction": "Instruction", "math": "Math"}


def combination_label(combination: str) -> str:
    """`code+instruction` -> `Code + Instruction`."""
    return " + ".join(EXPERT_LABELS.get(p, p) for p in combination.split("+"))


@dataclass(frozen=True)
class Row:
    """One line of the table: a reference model (method None) or a merge of a combination."""

    combination: str  # "code+math"; for references the model's name ("base", "code", ...)
    method: str | None
    scores: dict[str, float]  # percent, per suite column

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


@dataclass(frozen=True)
class Table:
    """Rows in display order, the suite's columns, and the method every delta is taken against."""

    columns: list[str]
    references: list[Row]
    merges: list[Row]
    baseline: str = "linear"

    def baseline_of(self, row: Row) -> Row | None:
        for other in self.merges:
            if other.combination == row.combination and other.method == self.baseline:
                return other
        return None

    def deltas(self, row: Row) -> dict[str, float] | None:
        """Score minus the baseline's, per column and for "Avg"; None without a baseline row."""
        base = self.baseline_of(row)
        if base is None or row.method is None:
            return None
        out = {c: row.scores[c] - base.scores[c] for c in self.columns}
        out["Avg"] = row.average - base.average
        return out


def to_markdown(table: Table) -> str:
    """Table 3 as markdown: `score (+delta)` for every method but the baseline."""
    header = ["Model(s)", "Method", *table.columns, "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.references:
        cells = [f"{row.scores[c]:.2f}" for c in table.columns] + [f"{row.average:.2f}"]
        lines.append(
            f"| {EXPERT_LABELS.get(row.combination, row.combination)} | - | "
            + " | ".join(cells)
            + " |"
        )
    previous = None
    for row in table.merges:
        deltas = table.deltas(row)
        values = [*(row.scores[c] for c in table.columns), row.average]
        keys = [*table.columns, "Avg"]
        if row.method == table.baseline or deltas is None:
            cells = [f"{v:.2f}" for v in values]
        else:
            cells = [f"{v:.2f} ({deltas[k]:+.2f})" for v, k in zip(values, keys)]
        name = combination_label(row.combination) if row.combination != previous else ""
        previous = row.combination
        label = METHOD_LABELS.get(row.method, row.method)
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One row per model: scores, deltas against the baseline (empty for references), average."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [*table.columns, "Avg"]
    writer.writerow(["combination", "method", *keys, *(f"{k} delta" for k in keys)])
    for row in table.references:
        writer.writerow(
            [
                row.combination,
                "",
                *(row.scores[c] for c in table.columns),
                row.average,
                *([""] * len(keys)),
            ]
        )
    for row in table.merges:
        deltas = table.deltas(row)
        values = [*(row.scores[c] for c in table.columns), row.average]
        writer.writerow(
            [
                row.combination,
                row.method,
                *values,
                *((deltas[k] for k in keys) if deltas else [""] * len(keys)),
            ]
        )
    return buffer.getvalue()


def to_png(table: Table) -> bytes:
    """Grouped bars: one panel per combination, tasks (and Avg) on x, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combinations = list(dict.fromkeys(r.combination for r in table.merges))
    methods = list(dict.fromkeys(r.method for r in table.merges))
    keys = [*table.columns, "Avg"]
    cols = min(2, len(combinations)) or 1
    rows = (len(combinations) + cols - 1) // cols or 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False, sharey=True
    )
    top = max([5.0] + [v for r in table.merges for v in [*r.scores.values(), r.average]])
    width = 0.8 / max(1, len(methods))
    for ax, combination in zip(axes.flat, combinations):
        for i, method in enumerate(methods):
            row = next(
                (r for r in table.merges if r.combination == combination and r.method == method),
                None,
            )
            if row is None:
                continue
            values = [*(row.scores[c] for c in table.columns), row.average]
            xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, values, width, label=METHOD_LABELS.get(method, method))
        ax.set_title(combination_label(combination))
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, top * 1.1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(combinations) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
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
