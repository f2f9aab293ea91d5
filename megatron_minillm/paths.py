"""Paths checked before any work: a run must not lose hours to a path it could never write, nor
fail with a parser's message on a path of the wrong kind.

:func:`check_output_path` is called by every tool and the trainer at start, before models load; it
writes nothing but a probe file it removes at once.
"""

import os
import shutil
import tempfile
from pathlib import Path

GB = 1e9


class OutputPathError(ValueError):
    """An output path that cannot be written (under a file, read-only, full, or existing)."""


def check_input_dir(path: str | Path, what: str, holds: str) -> Path:
    """``path`` must be an existing directory (holding ``holds``): a parser's message about a file
    read in its place (``Extra data: line 2``) would not say what is wrong."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise NotADirectoryError(f"{what} {path} {state}; give the directory holding {holds}")
    return path


def check_output_path(
    path: str | Path,
    what: str,
    *,
    expected_bytes: int | None = None,
    exist_ok: bool = False,
    is_dir: bool = True,
) -> Path:
    """Check that ``path`` (named ``what`` in errors, e.g. ``--out``) can be written; return it.

    Its nearest existing ancestor must be a writable directory (a probe file is created there:
    ``os.access`` alone trusts read-only mounts and /proc), ``path`` itself must be a directory or
    absent (``is_dir``) or a file or absent (not ``is_dir``); an existing ``path`` is refused unless
    ``exist_ok``; with ``expected_bytes``, that much space must be free.
    """
    path = Path(path)
    kind = "directory" if is_dir else "file"
    if path.exists():
        if path.is_dir() != is_dir:
            raise OutputPathError(f"{what} {path} is a {'file' if is_dir else 'directory'}; give a {kind} path")
        if not exist_ok:
            raise OutputPathError(f"{what} {path} exists; pass --overwrite to replace it")
    start = (path if is_dir else path.parent).absolute()
    base = next(p for p in (start, *start.parents) if p.exists())  # / at worst
    if not base.is_dir():
        raise OutputPathError(f"{what} {path}: {base} is a file, not a directory")
    _probe(base, what, path)
    if expected_bytes is not None:
        free = shutil.disk_usage(base).free
        if free < expected_bytes:
            raise OutputPathError(
                f"{what} {path}: needs about {expected_bytes / GB:.2f} GB, only {free / GB:.2f} GB free "
                f"under {base}; free space or choose another path"
            )
    return path


def _probe(directory: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``directory``: the one test that read-only mounts cannot fool."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".minillm-probe-"):
            pass
    except OSError as err:
        raise OutputPathError(
            f"{what} {path}: cannot write in {directory} ({os.strerror(err.errno) if err.errno else err}); "
            "choose a writable path"
        ) from None


def tree_bytes(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> int:
    """Total size of the files under directory ``path`` matching any of ``patterns`` (0 when absent)."""
    files = {f for pattern in patterns for f in Path(path).rglob(pattern) if f.is_file()}
    return sum(f.stat().st_size for f in files)
