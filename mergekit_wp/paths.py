"""Paths the user names: model folders checked before loading, output folders before writing.

Every check raises ValueError with one line naming the path and what was expected; writes go
to a temporary name next to the target and are renamed into place, with the user's umask.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
