"""Atomic file writes: JSON summaries, ``.npz`` arrays and raw bytes.

Each write goes to a temporary file in the target's own directory, is flushed and ``fsync``-ed, and is then moved
over the target with :func:`os.replace`, which is atomic on POSIX and Windows when both paths are on one file
system. A reader therefore sees either the old file or the whole new one, never a torn write, even if the process
dies mid-way; the temporary file is removed on failure.

JSON is written strictly (``allow_nan=False``): non-finite floats become ``null``, numpy scalars and arrays become
numbers and lists, so that any JSON reader can parse the file. Arrays keep their nan values in ``.npz`` files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "save_json", "save_npz", "to_jsonable"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    The parent directory is created if needed. On an exception the temporary file is deleted and ``path`` is
    left as it was.

    Args:
        path: The final file.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    Raises:
        ValueError: If ``mode`` is not ``"wb"`` or ``"w"``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` for strict JSON: non-finite floats to ``None``, numpy/torch values to Python, dataclasses
    and mappings to dicts, tuples and arrays to lists, paths to strings.

    Raises:
        TypeError: For an object with no JSON form.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor without importing torch
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot write an object of type {type(obj).__name__} to JSON")


def save_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_jsonable`) to ``path`` atomically; returns the path."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write ``arrays`` to a compressed ``.npz`` file atomically (nan values kept); returns the path.

    ``None`` values are skipped. The path is used as given (numpy's automatic ``.npz`` suffix does not apply).

    Raises:
        ValueError: If no array is given.
    """
    data = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    if not data:
        raise ValueError("save_npz needs at least one array, got none")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **data)
    return atomic_write_bytes(path, buffer.getvalue())
