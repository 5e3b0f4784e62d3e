"""Small shared helpers: clear errors with suggestions, atomic output folders and files, seeding."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


class MeraserError(Exception):
    """An error caused by user input (bad config, data, names, paths); the CLI prints it without a traceback."""


class OutputExistsError(MeraserError):
    pass


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> MeraserError:
    choices = sorted(choices)
    return MeraserError(f"unknown {kind} '{name}'{did_you_mean(name, choices)} (choices: {', '.join(choices)})")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output folder unless `overwrite`; checked before any work starts."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    An interrupted write leaves only a hidden `.name.tmp-*` folder, never a half-written `path`.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write a file through a temporary sibling and a rename; `mode` (e.g. 0o600) is set before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; a missing file or bad JSON becomes a MeraserError naming the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MeraserError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise MeraserError(f"{path}:{e.lineno}: invalid JSON in {what}: {e.msg}") from None


def write_json(path: str | os.PathLike, obj, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", mode=mode)


def append_jsonl(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | os.PathLike, what: str = "file"):
    """(line number, record) for each non-blank line; bad JSON becomes a MeraserError naming the file and line."""
    path = Path(path)
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise MeraserError(f"{path}:{i}: invalid JSON in {what}: {e.msg}") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list:
    """Records of a JSONL file; a missing file reads as empty (results logs that do not exist yet)."""
    return [rec for _, rec in iter_jsonl(path, what)] if Path(path).exists() else []


def set_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """meraser's cache: $MERASER_CACHE, else $XDG_CACHE_HOME/meraser, else ~/.cache/meraser."""
    if os.environ.get("MERASER_CACHE"):
        return Path(os.environ["MERASER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meraser"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def console(log_width: int | None = None):
    """A rich Console. With `log_width`, output that is not a terminal (a log file) gets that many columns instead
    of rich's 80, so wide tables arrive whole."""
    import sys

    from rich.console import Console

    return Console(width=log_width if log_width and not sys.stdout.isatty() else None)
