"""Packaging: the wheel carries what a pip install needs (eval suites, task YAML, the zoo), a wheel
install runs the micro eval from outside any checkout, and importing the package stays light."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shipped(folder: Path) -> list[str]:
    """The files of a checkout folder, relative to it, as a wheel should carry them."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built offline with the installed hatchling (the dev extra)."""
    folder = tmp_path_factory.mktemp("wheel")
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    built = run([*args, "-w", str(folder), str(ROOT)], cwd=folder)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = folder.glob("mergekit_wp-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a bare folder, put first on PYTHONPATH by the tests."""
    target = tmp_path_factory.mktemp("site")
    args = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
    done = run([*args, str(wheel)], cwd=target)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_wheel_carries_evals_zoo_and_startup_hook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, inside in (
        (ROOT / "evals", "mergekit_wp/_evals"),
        (ROOT / "mergekit_wp/zoo/models", "mergekit_wp/zoo/models"),
        (ROOT / "mergekit_wp/zoo/data", "mergekit_wp/zoo/data"),
    ):
        missing = [f for f in shipped(folder) if f"{inside}/{f}" not in names]
        assert shipped(folder) and not missing, f"{folder} files missing from the wheel: {missing}"
    assert {"_mergekit_wp_hook.py", "mergekit_wp_hook.pth"} <= names


def test_wheel_install_runs_the_micro_eval_outside_the_checkout(installed, tmp_path):
    python = [sys.executable, "-c"]
    where = run(
        [*python, "import mergekit_wp; print(mergekit_wp.__file__)"],
        tmp_path,
        PYTHONPATH=str(installed),
    )
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    out = tmp_path / "out"
    base = installed / "mergekit_wp/zoo/models/base"
    args = [
        str(installed / "bin/mergekit-wp"),
        "eval",
        str(base),
        "--suite",
        "micro",
        "--limit",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    done = run(args, tmp_path, PYTHONPATH=str(installed), OMP_WAIT_POLICY="PASSIVE")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mergekit_wp"]["suite"] == str(installed / "mergekit_wp/_evals/micro.yml")
    with (out / "summary.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert row["suite"] == "micro" and row["limit"] == "1"
    assert {"IFEval", "GSM8K", "HumanEval", "Knowledge"} <= set(row)


def test_importing_the_package_imports_neither_torch_nor_mergekit(tmp_path):
    code = (
        "import mergekit_wp, sys; "
        "assert 'torch' not in sys.modules and 'mergekit' not in sys.modules"
    )
    done = run([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
