"""Resumable partial results: score sums plus the set of finished steps, saved atomically.

A step (one batch of a gradient pass, or one batch x unit kind x layer of an exact sweep) is
added to the sums in memory and then committed: sums and the done-set are written together
with temp file + rename, so after `kill -9` a step is either fully in or redone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mergekit_wp.io import atomic_file

log = logging.getLogger(__name__)


class RunState:
    """Sums (`name -> fp64 tensor`) and finished steps of one process of one scoring run."""

    def __init__(self, path: Path | None, digest: str = "") -> None:
        self.path, self.digest = path, digest  # no path: kept in memory only
        self.sums: dict[str, torch.Tensor] = {}
        self.done: set[str] = set()
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") == digest:
                self.sums, self.done = saved["sums"], set(saved["done"])
                log.info("resuming %s: %d steps already done", path, len(self.done))
            else:
                log.warning("%s belongs to a different configuration; starting afresh", path)

    def total(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The running sum `name`, created as zeros shaped like `like`."""
        if name not in self.sums:
            self.sums[name] = torch.zeros_like(like, dtype=torch.float64)
        return self.sums[name]

    def commit(self, step: str) -> None:
        """Mark `step` done and write sums + done-set in one atomic replace."""
        self.done.add(step)
        if self.path is None:
            return
        state = {"fingerprint": self.digest, "sums": self.sums, "done": sorted(self.done)}
        atomic_file(self.path, lambda tmp: torch.save(state, tmp))
