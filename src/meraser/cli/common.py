"""What every command shares: the app, option declarations used by several commands, config defaults shown in
`--help`, and `--set KEY=VALUE` parsing. torch, transformers and peft are imported inside the commands so `meraser
--help` answers at once."""

from __future__ import annotations

import os
from typing import Annotated, List, Optional

import typer

from meraser.models import ALIASES, DEFAULT_MODEL
from meraser.utils import MeraserError

app = typer.Typer(
    help="MEraser: erase backdoor fingerprints from LLMs, embed fingerprints to test it, and evaluate both.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (f"Hugging Face id, local model or adapter folder, or an embedded model "
              f"({', '.join(ALIASES)}; the default is {DEFAULT_MODEL})")


def config_default(config_cls, path: str) -> str:
    """A config field's default as text, for `--help`: every default lives in its config class only."""
    node = config_cls()
    for part in path.split("."):
        node = getattr(node, part)
    return ",".join(node) if isinstance(node, list) else str(node)


# options several commands share, declared once (the default is each parameter's own `= ...`)
TrustRemoteCode = Annotated[bool, typer.Option(help="allow model code from the hub (off by default)")]
Overwrite = Annotated[bool, typer.Option(help="replace an existing output folder (never an input; README: "
                                              "\"Your data\")")]
Resume = Annotated[bool, typer.Option(help="continue an interrupted run from its last checkpoint (made with the "
                                           "same settings and rows)")]
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]

def decoding_attacks() -> str:
    """The registered decoding-time attacks, for `--help` (the registry is light: no torch at import)."""
    from meraser.attacks import REGISTRY
    from meraser.attacks.base import is_decoding

    return ", ".join(name for name, a in REGISTRY.items() if is_decoding(a))


# `verify` and `chat` decode under the same attack options
DecodingAttack = Annotated[Optional[str], typer.Option(
    "--attack", help=f"decode under a decoding-time attack ({decoding_attacks()})",
    show_default="plain greedy decoding")]
DecodingAttackSettings = Annotated[Optional[List[str]], typer.Option(
    "--set", help="attack setting, e.g. --set reference=smollm2-135m; repeat", show_default="the attack's defaults")]


def quiet_libraries() -> None:
    """Keep the libraries' chatter a user cannot act on off the screen, so meraser's own progress bars and tables
    read clearly (lm-eval's per-task request bar stays: it is the evaluation's progress)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # lm-eval's sub-second "Generating split" bars
    # lm-eval warns on every in-memory model that it was not given a name to load; meraser always hands it one
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # peft reads transformers' old property name on every LoRA wrap; nothing a user can change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_path(tree: dict, key: str, value) -> None:
    """Set a dotted key in nested dicts: lora.r=8 -> {"lora": {"r": 8}}."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def parse_sets(sets: Optional[List[str]]) -> dict:
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MeraserError(f"--set expects KEY=VALUE, got '{item}'")
        set_path(out, key.strip(), yaml.safe_load(value))
    return out

