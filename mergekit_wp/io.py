"""Files and models the user names: checked before loading, written atomically, fingerprinted.

Every check raises ValueError with one line naming the path and what was expected; writes go
to a temporary name next to the target and are renamed into place, with the user's umask.
Models load through `load_model` (one dtype policy: `resolve_dtype`); cached results are keyed
by `fingerprint_path` / `reference_fingerprint` / `settings_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(reference: str) -> bool:
    """Whether `reference` has the form of a Hugging Face Hub id (owner/name)."""
    return bool(_HUB_ID.match(reference)) and not reference.startswith((".", "~"))


def check_model(model: str | os.PathLike) -> str:
    """A model folder (resolved) or Hub id; ValueError unless it can be a model."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {path} is a file; expected a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {path} is not a Hugging Face model folder: no config.json "
                f"(expected config.json, weights and tokenizer files, as save_pretrained writes)"
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ValueError(
                f"model {path} has a config.json but no *.safetensors or *.bin weights"
            )
        return str(path.resolve())
    if is_hub_id(str(model)):
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(str(model), "config.json"), str
        ):
            raise ValueError(
                f"model {model}: no such folder, and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so it cannot be downloaded)"
            )
        return str(model)  # the Hub (or its local cache) serves it
    raise ValueError(f"model {model}: no such folder, and not a Hugging Face Hub id (owner/name)")


def check_weights(model: str | os.PathLike) -> None:
    """ValueError naming the first `*.safetensors` file of a local model folder that is unreadable.

    Only headers are read (the file's size must match them), so this costs milliseconds.
    """
    from safetensors import safe_open

    folder = Path(model)
    if not folder.is_dir():
        return  # a Hub id
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
            raise ValueError(
                f"model {folder}: {file.name} is not a readable safetensors file ({err}); "
                "copy or download the model again"
            ) from None


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a folder that can be created or written; ValueError naming it otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; expected a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {existing} is not writable (permission denied)")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the umask (mkstemp gives 0o600)."""
    return 0o666 & ~_umask()


def atomic_file(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(temp_path)` next to `path`, then rename: readers never see half a file.

    The temp name keeps `path`'s suffix (writers such as matplotlib pick the format from it);
    the file gets the user's umask (mkstemp makes 0600). On any failure the temp file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_file(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def staging_dir(final: str | os.PathLike) -> Path:
    """An empty temporary folder next to `final` (same filesystem, so it can be renamed in)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Give a finished folder the user's umask, then swap it in for `final` (if any).

    Two renames: `final` never holds a mix of old and new files, and a crash in between leaves
    the old folder next to it, not half of one.
    """
    tmp, final = Path(tmp), Path(final)
    mask = _umask()
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and mergekit's writer give 0o700 / 0o600
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rename(final, old / final.name)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    return final


# --- fingerprints ----------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def fingerprint_path(path: str | os.PathLike) -> str:
    """Hash of a file or model folder: small files by content, weight files by name, size, mtime.

    Weights of real models are tens of GB; hashing them on every run would cost minutes, and a
    rewrite changes their mtime anyway.
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


def reference_fingerprint(reference: str | os.PathLike) -> str:
    """What a local file or folder holds; a hub id (or any missing path) stands for itself."""
    path = Path(reference)
    return fingerprint_path(path) if path.exists() else str(reference)


def settings_fingerprint(settings: Any) -> str:
    """Stable digest of everything that determines a result (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# --- models ----------------------------------------------------------------------------------
def resolve_model(reference: str) -> str:
    """A folder or hub id for `zoo:NAME` (mergekit_wp.zoo.model_path) or a plain reference."""
    if reference.startswith("zoo:"):
        from mergekit_wp.zoo import model_path

        return str(model_path(reference[len("zoo:") :]))
    return reference


_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matmuls
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is missing."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8")
    except OSError:
        return set()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return {flag for line in lines for flag in line.split(":", 1)[1].split()}


def auto_dtype(device: str) -> tuple[str, str]:
    """`dtype: auto`: (dtype, why). bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if device.startswith("cuda"):
        return "bfloat16", "CUDA device"
    native = [flag for flag in _NATIVE_BF16_FLAGS if flag in cpu_flags()]
    if native:
        return "bfloat16", f"the CPU has native bf16 ({', '.join(native)}): half the memory"
    return "float32", "the CPU has no native bf16 (no amx_bf16 / avx512_bf16 flag)"


def resolve_dtype(dtype: str, device: str) -> str:
    """The configured dtype, with `auto` resolved and the choice logged."""
    if dtype != "auto":
        return dtype
    dtype, why = auto_dtype(device)
    log.info("dtype: auto -> %s (%s); set dtype explicitly to override", dtype, why)
    return dtype


def load_model(
    reference: str,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    device_map: Any = None,
):
    """An HF causal LM (folder, hub id or `zoo:NAME`) in eval mode, frozen, in `dtype` on `device`.

    `dtype: auto` follows `resolve_dtype`; with `device_map` transformers places the layers.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve_model(reference), **kwargs)
    if not device_map:
        model.to(device)
    if str(device).startswith("cpu") or dtype == "float64":
        # A mixture's default experts kernel (grouped_mm) refuses fp64, and on the CPU any shape
        # not 16-byte aligned; the eager loop over experts computes the same outputs (dense
        # models are eager already).
        model.config._experts_implementation = "eager"
    return model.eval().requires_grad_(False)
