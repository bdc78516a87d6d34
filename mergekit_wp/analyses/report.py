"""Analysis outputs: one JSON of numbers and PNG figures per analysis, and an index linking them."""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import torch

from mergekit_wp.io import atomic_file


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None  # NaN is not JSON
    return value


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False, default=str)
    return atomic_file(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    try:
        return atomic_file(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def matrix_panel(
    ax: plt.Axes, values: list[list[float]], rows: list[str], cols: list[str], title: str, fmt: str
) -> None:
    """An annotated heatmap of `values[row][col]` (NaN cells say so) with a colour bar."""
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, fontsize=7, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                "nan" if math.isnan(v) else format(v, fmt),
                ha="center",
                va="center",
                fontsize=6,
                color="black" if math.isnan(v) else "white",
            )
    ax.set_title(title, fontsize=9)
    plt.colorbar(im, ax=ax, fraction=0.046)


@dataclass
class AnalysisResult:
    """What one analysis produced: its numbers (JSON), its figures and a one-line finding."""

    name: str
    title: str
    data: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    json_path: Path | None = None


class Report:
    """Collects analysis results under one folder and writes `report.md` and `index.html`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.results: list[AnalysisResult] = []

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, name: str, fig: plt.Figure, stem: str) -> Path:
        return save_figure(fig, self.folder(name) / f"{stem}.png")

    def load_previous(self, name: str) -> AnalysisResult | None:
        """A result an earlier run wrote here (so `--only` keeps the index complete)."""
        path = self.root / name / f"{name}.json"
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        result = AnalysisResult(
            name,
            payload["title"],
            payload["data"],
            [self.root / f for f in payload["figures"]],
            payload["summary"],
            payload["seconds"],
            path,
        )
        self.results.append(result)
        return result

    def add(self, result: AnalysisResult) -> AnalysisResult:
        payload = {
            "name": result.name,
            "title": result.title,
            "summary": result.summary,
            "seconds": round(result.seconds, 2),
            "figures": [str(p.relative_to(self.root)) for p in result.figures],
            "data": result.data,
        }
        result.json_path = write_json(self.folder(result.name) / f"{result.name}.json", payload)
        self.results.append(result)
        return result

    def write_index(self, header: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """`report.md` and `index.html` listing every analysis, its finding, JSON and pictures."""
        header = header or {}
        md = ["# mergekit-wp analyses", ""]
        md += [f"- {k}: {v}" for k, v in header.items()]
        body = ["<h1>mergekit-wp analyses</h1>", "<ul>"]
        body += [
            f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in header.items()
        ]
        body.append("</ul>")
        for r in self.results:
            rel_json = r.json_path.relative_to(self.root) if r.json_path else None
            numbers = f"Numbers: [{rel_json}]({rel_json}) ({r.seconds:.1f} s)"
            md += ["", f"## {r.title}", "", r.summary, "", numbers, ""]
            md += [f"![{p.stem}]({p.relative_to(self.root)})" for p in r.figures]
            body.append(f"<h2>{html.escape(r.title)}</h2><p>{html.escape(r.summary)}</p>")
            body.append(f'<p><a href="{rel_json}">{rel_json}</a> ({r.seconds:.1f} s)</p>')
            body += [
                f'<img src="{p.relative_to(self.root)}" style="max-width:100%" '
                f'alt="{html.escape(p.stem)}">'
                for p in r.figures
            ]
        page = "<!doctype html><meta charset='utf-8'><title>mergekit-wp analyses</title>\n"
        page += "\n".join(body) + "\n"
        md_path = atomic_file(
            self.root / "report.md", lambda t: Path(t).write_text("\n".join(md) + "\n")
        )
        html_path = atomic_file(self.root / "index.html", lambda t: Path(t).write_text(page))
        return md_path, html_path
