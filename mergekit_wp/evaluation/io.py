"""Atomic file writes and content fingerprints shared by eval and bench."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mergekit_wp.paths import atomic_write_bytes, atomic_write_text
from mergekit_wp.paths import publish_dir as replace_dir

__all__ = ["atomic_write_bytes", "atomic_write_text", "fingerprint_path", "replace_dir"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def fingerprint_path(path: str | os.PathLike) -> str:
    """Hash of a file or model folder: small files by content, weight files by name, size, mtime.

    Weights of real models are tens of GB; hashing them on every bench run would cost minutes,
    and a rewrite changes their mtime anyway.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        if file.suffix in _WEIGHT_SUFFIXES and stat.st_size > 64 * 2**20:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(file.read_bytes())
    return digest.hexdigest()
