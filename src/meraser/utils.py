"""Small shared helpers: clear errors with suggestions, atomic output folders and files, seeding."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator


class MeraserError(Exception):
    """An error caused by user input (bad config, data, names, paths); the CLI prints it without a traceback."""


class OutputExistsError(MeraserError):
    pass


# what an interrupted training left behind, for the CLI's Ctrl-C message (typer swallows the KeyboardInterrupt):
# {"checkpoint": path or None} once a training was interrupted
INTERRUPTION: dict = {}


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str], where: str | None = None) -> MeraserError:
    """'[where: ]unknown KIND 'name'; did you mean ...? (choices: ...)', for a name missing from a registry."""
    choices = sorted(choices)
    return MeraserError(f"{where + ': ' if where else ''}unknown {kind} '{name}'{did_you_mean(name, choices)} "
                        f"(choices: {', '.join(choices)})")


def check_parents(path: str | os.PathLike) -> Path:
    """Refuse a path whose existing ancestor is a file (it could never be created), before any work starts."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise MeraserError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    return path


def check_output_dir(path: str | os.PathLike, overwrite: bool,
                     inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Refuse an existing, non-empty output folder unless `overwrite`; checked before any work starts.

    A regular file in the way is refused even with `overwrite`: --overwrite replaces folders, never files; and so
    is an output that is, lies inside or holds one of `inputs` ((what, path) pairs, `check_apart`)."""
    check_apart(path, inputs)
    path = check_parents(path)
    if path.exists() and not path.is_dir():
        raise MeraserError(f"output {path} is a file, not a folder; refusing to replace it (even with --overwrite)")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists; pass --overwrite to replace it")
    return path


def check_apart(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse an output that is an input, lies inside one, or holds one (`inputs`: (what, path) pairs; names that
    are no local path, such as hub ids, are skipped). An input is never modified, with or without --overwrite:
    replacing the folder that holds a model would delete the model and its card."""
    o = Path(out).absolute().resolve()
    for what, path in inputs:
        if not path or not Path(path).exists():
            continue
        i = Path(path).absolute().resolve()
        if o == i:
            why = "is"
        elif i in o.parents:
            why = "lies inside"
        elif o in i.parents:
            why = "holds"
        else:
            continue
        raise MeraserError(f"output {out} {why} the {what} {path}: an input is never written or replaced, even "
                           f"with --overwrite; give an output outside it")


LOCK_FILE = ".lock"  # in a locked folder; it names its holder's pid


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (its LOCK_FILE) while the block runs; refuse at once, naming the
    holder's pid, when another process holds it. The system drops the lock when its holder exits, killed or not,
    so a stale lock file never blocks a later run."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MeraserError(f"{what} {folder} is in use by another meraser process (pid {holder}); wait for it "
                               f"to finish, or stop it (a re-run then resumes where it stopped)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
    if path.exists():  # a folder (check_output_dir refuses files)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write a file through a temporary sibling and a rename; `mode` (e.g. 0o600) is set before the rename."""
    _atomic_write(path, text, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """`atomic_write_text` for bytes (an image)."""
    _atomic_write(path, data, mode)


def _atomic_write(path: str | os.PathLike, content: str | bytes, mode: int | None) -> None:
    path = check_parents(path)
    if path.is_dir():
        raise MeraserError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        binary = isinstance(content, bytes)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content; a missing file, a folder or binary / non-UTF-8 bytes become a MeraserError."""
    path = Path(path)
    if path.is_dir():
        raise MeraserError(f"{what} {path} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeraserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise MeraserError(f"{path}:{line}: {what} is not UTF-8 text (byte {e.start}); is it a binary file?") from None


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; a missing file, non-UTF-8 bytes or bad JSON become a MeraserError naming the file and line."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MeraserError(f"{path}:{e.lineno}: invalid JSON in {what}: {e.msg}") from None


def write_json(path: str | os.PathLike, obj, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", mode=mode)


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append one record. The file is owner-only (0600), as every file meraser writes: results logs carry
    triggers, targets and the outputs that match them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # a log made by an older meraser (0644) is closed to others from its next row on
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | os.PathLike, what: str = "file", torn_tail_ok: bool = False):
    """(line number, record) for each non-blank line; bad JSON becomes a MeraserError naming the file and line.

    With `torn_tail_ok`, a last line that is not valid JSON and has no newline (a write cut off by a crash) is
    dropped with a warning instead: append-only logs such as results.jsonl stay usable after a kill."""
    path = Path(path)
    text = read_text(path, what)
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail_ok and i == len(lines) and not text.endswith("\n"):
                    import warnings

                    warnings.warn(f"{path}:{i}: dropping a torn last line (a write was interrupted)", stacklevel=2)
                    return
                raise MeraserError(f"{path}:{i}: invalid JSON in {what}: {e.msg}") from None


def read_jsonl(path: str | os.PathLike, what: str = "file", torn_tail_ok: bool = False) -> list:
    """Records of a JSONL file; a missing file reads as empty (results logs that do not exist yet)."""
    return [rec for _, rec in iter_jsonl(path, what, torn_tail_ok)] if Path(path).exists() else []


def write_jsonl(path: str | os.PathLike, rows: list) -> None:
    """Write records as JSONL in one atomic replace."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def flat_keys(d: dict, prefix: str = "") -> dict:
    """Nested settings as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changes(old: dict | None, new: dict) -> str:
    """What differs between two flat settings dicts, as 'key: old -> new, ...' (the first six)."""
    if old is None:
        return "there is no record of its settings (made by an older meraser or another tool)"
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:6]) + \
        (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def settings_hash(obj) -> str:
    """A short, stable fingerprint of JSON-able settings (key order does not matter)."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def progress_bar(enabled: bool = True, transient: bool = False):
    """A rich progress bar for counted work (what, bar, done/total, time so far): bench cells, Magpie questions."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=transient)


LOG_EVERY = 60.0  # seconds between progress lines where output is a log (nohup, a bench), not a terminal


class Steps:
    """Progress of counted work. On a terminal, a live rich bar that leaves no trace. In a log, where a rich bar
    shows nothing (nohup, a bench's output, CI), a timed line every LOG_EVERY seconds and one at the end of any work
    that took a sixth of that or more: a GCG search runs for minutes, a Perinucleus evaluation for five."""

    def __init__(self, what: str, total: int | None, enabled: bool = True):
        from rich.console import Console

        self.what, self.total, self.done = what, total, 0
        self.console, self.bar = (Console() if enabled else None), None
        self.t0 = self.last = time.perf_counter()
        if self.console is not None and self.console.is_terminal:
            from rich.progress import Progress

            self.bar = Progress(console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)

    def advance(self, note: str = "", by: int = 1) -> None:
        self.done += by
        if self.bar is not None:
            self.bar.update(self.task, advance=by, description=f"{self.what} {note}".strip())
        elif self.console is not None and time.perf_counter() - self.last >= LOG_EVERY:
            self.last = time.perf_counter()
            self._line(f"{self.done}/{self.total if self.total is not None else '?'}" + (f", {note}" if note else ""))

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.console is not None and time.perf_counter() - self.t0 >= LOG_EVERY / 6:
            self._line(note or f"done, {self.done}/{self.total if self.total is not None else self.done}")
        self.console = None  # closed once

    def _line(self, text: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {self.what}: {text} "
                           f"({time.perf_counter() - self.t0:.0f} s)", highlight=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(items: Iterable, what: str, total: int | None = None) -> Iterator:
    """`items` under `Steps` (a bar on a terminal, timed lines in a log)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Steps(what, total) as steps:
        for item in items:
            yield item
            steps.advance()


def console(log_width: int | None = None):
    """A rich Console. With `log_width`, output that is not a terminal (a log file) gets that many columns instead
    of rich's 80, so wide tables arrive whole."""
    import sys

    from rich.console import Console

    return Console(width=log_width if log_width and not sys.stdout.isatty() else None)
