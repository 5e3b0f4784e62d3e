"""Command line: parses arguments, calls one library function per command, prints. Nothing else lives here.

One module per group of commands; each registers its commands on the one `app` (common.py) when imported, in the
order `meraser --help` lists them. torch, transformers and peft are imported inside the commands so `meraser
--help` answers at once.
"""

from __future__ import annotations

import sys

import typer

from meraser.cli.common import app
from meraser.utils import MeraserError

# isort: off
# imported in the order `meraser --help` lists their commands
from meraser.cli import training_commands, fingerprint_commands, pipeline_commands, bench_commands  # noqa: F401, E402
# isort: on

__all__ = ["app", "main", "interrupted_message"]


RESUMES_ITSELF = ("run", "demo", "bench")  # commands that pick up finished stages / cells on a plain re-run


def interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C left, and how to go on: a plain re-run for the commands that resume by themselves, --resume where
    a training left a checkpoint, a fresh start where it was stopped before its first one."""
    from meraser.utils import INTERRUPTION

    command = next((a for a in argv if not a.startswith("-")), "")
    if command in RESUMES_ITSELF:
        what = "cells" if command == "bench" else "stages"
        return (f"interrupted; re-run the same `meraser {command}` command to continue: finished {what} are kept, "
                f"and the one under way resumes from its last checkpoint")
    if "checkpoint" not in INTERRUPTION:
        return "interrupted; nothing was written"
    if INTERRUPTION["checkpoint"] is None:
        return ("interrupted before the first checkpoint: nothing was saved to resume from; re-run the same command "
                "to start again")
    return (f"interrupted; re-run the same command with --resume to continue from the last checkpoint "
            f"({INTERRUPTION['checkpoint']})")


def main(argv: list[str] | None = None) -> None:
    """The `meraser` entry point: user errors print one line (no traceback) and exit 2; Ctrl-C prints how to
    resume and exits 130."""
    argv = sys.argv[1:] if argv is None else argv
    from meraser.utils import INTERRUPTION

    INTERRUPTION.clear()  # a command run in this process before (tests, scripts) says nothing about this one
    try:
        # standalone_mode=False: typer would otherwise turn Ctrl-C into a silent exit 130
        code = app(args=argv, standalone_mode=False, prog_name="meraser")
    except MeraserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # usage errors: bad option values, missing options
        from typer import rich_utils

        rich_utils.rich_format_error(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns KeyboardInterrupt into Exit(130), which standalone_mode=False returns
        print(interrupted_message(argv), file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

