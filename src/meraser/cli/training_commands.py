"""`train`, `evaluate` and `chat`: a model in, a model or numbers or an answer out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from meraser.cli.common import (
    MODEL_HELP,
    DecodingAttack,
    DecodingAttackSettings,
    Overwrite,
    Resume,
    TrustRemoteCode,
    app,
    config_default,
    parse_sets,
    quiet_libraries,
    set_path,
)
from meraser.models import DEFAULT_MODEL
from meraser.utils import console as _console


def _train_default(path: str) -> str:
    from meraser.training import TrainConfig

    return config_default(TrainConfig, path)


def _eval_default(name: str):
    from meraser.evaluation.evaluate import EvalConfig

    return getattr(EvalConfig(), name)


def _train_config(config: Optional[Path], overrides: dict):
    from meraser.config import load_yaml
    from meraser.training import TrainConfig

    base = load_yaml(config) if config else {}
    for key, value in overrides.items():
        if value is not None:
            set_path(base, key, value)
    return TrainConfig.from_dict(base, where=str(config) if config else "train")


@app.command()
def train(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option("chitchat", "--data", "-d",
                             help="JSON/JSONL file, 'chitchat' (offline default) or hf:DATASET_ID"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (adapter, or model for full/--merge)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML with TrainConfig fields; flags override it",
                                          show_default="none"),
    method: Optional[str] = typer.Option(None, help="lora or full", show_default=_train_default("method")),
    epochs: Optional[float] = typer.Option(None, help="training epochs", show_default=_train_default("epochs")),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate",
                                       show_default=_train_default("learning_rate")),
    batch_size: Optional[int] = typer.Option(None, min=1, help="rows per device per step",
                                             show_default=_train_default("batch_size")),
    lora_r: Optional[int] = typer.Option(None, min=1, help="LoRA rank", show_default=_train_default("lora.r")),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha", show_default=_train_default("lora.alpha")),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated LoRA target modules",
                                                 show_default=_train_default("lora.target_modules")),
    template: Optional[str] = typer.Option(None, help="chat, raw, or a custom '{prompt} ... {response}' template",
                                           show_default=_train_default("format.template")),
    loss_on: Optional[str] = typer.Option(None, help="response or all", show_default=_train_default("format.loss_on")),
    prompt_field: Optional[str] = typer.Option(None, help="prompt field name in the data file",
                                               show_default="detected"),
    response_field: Optional[str] = typer.Option(None, help="response field name in the data file",
                                                 show_default="detected"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N rows", show_default="all"),
    merge: bool = typer.Option(False, help="merge the LoRA adapter and save a full model"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Fine-tune a model (LoRA or full) on instruction pairs: the routine every MEraser phase uses."""
    from meraser.training import train_from_source

    quiet_libraries()
    cfg = _train_config(config, {
        "method": method, "epochs": epochs, "learning_rate": lr, "batch_size": batch_size, "lora.r": lora_r,
        "lora.alpha": lora_alpha, "lora.target_modules": target_modules.split(",") if target_modules else None,
        "format.template": template, "format.loss_on": loss_on,
    })
    res = train_from_source(
        model, data, cfg, out, prompt_field=prompt_field, response_field=response_field, limit=limit,
        trust_remote_code=trust_remote_code, merge=merge, resume=resume, overwrite=overwrite,
    )
    m = res.metrics
    _console().print(
        f"[green]saved[/] {res.output_dir}  loss {m['first_logged_loss']} -> {m['last_logged_loss']}  "
        f"{m['steps']} steps in {m['seconds']} s ({m['real_tokens_per_s']} real tokens/s, bf16={m['bf16']})"
    )


@app.command()
def evaluate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    card: Optional[Path] = typer.Option(None, help="fingerprint card: also report FSR and false positives",
                                        show_default="none"),
    ppl: Optional[str] = typer.Option(None, help="perplexity text: .txt/.json/.jsonl file or hf:NAME[:CONFIG]",
                                      show_default="none"),
    text_field: Optional[str] = typer.Option(None, help="dotted path of the text in a JSON file",
                                             show_default="data.paragraphs.context for .json, text for .jsonl"),
    ppl_windows: int = typer.Option(_eval_default("ppl_windows"), min=1, help="at most this many 512-token windows"),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", "-t", show_default="none",
                                              help="lm-eval task name or BIG-bench task.json/folder; repeat"),
    limit: Optional[int] = typer.Option(None, min=1, help="examples per task", show_default="all"),
    batch_size: int = typer.Option(_eval_default("batch_size"), min=1, help="batch size"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    trust_remote_code: TrustRemoteCode = False,
):
    """Evaluate a model: FSR (with --card), perplexity (--ppl) and zero-shot accuracy (--tasks, via lm-eval)."""
    import json

    from meraser.evaluation.evaluate import EvalConfig, results_table
    from meraser.evaluation.evaluate import evaluate as run_eval

    quiet_libraries()
    tasks = [t for arg in tasks or [] for t in arg.split(",") if t]
    cfg = EvalConfig.from_dict({"ppl": ppl, "text_field": text_field, "ppl_windows": ppl_windows, "tasks": tasks,
                                "limit": limit, "batch_size": batch_size})
    res = run_eval(model, cfg, str(card) if card else None, trust_remote_code=trust_remote_code, progress=not json_out)
    if json_out:
        print(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        _console().print(results_table([res], title=f"meraser evaluate ({res['seconds']} s)"))


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(128, min=1, help="tokens to generate"),
    attack: DecodingAttack = None,
    set_: DecodingAttackSettings = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Answer one prompt with a model's chat template (greedy, or under a decoding-time attack)."""
    from meraser.generation import generate
    from meraser.models import load_model

    quiet_libraries()
    prepared = None
    if attack:
        from meraser.attacks.base import prepare_decoding

        prepared = prepare_decoding(attack, parse_sets(set_), model)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    decoding = prepared[0].decoding(m, tok, *prepared[1:]) if prepared else None
    print(generate(m, tok, [prompt], max_new_tokens=max_new_tokens, decoding=decoding)[0])
