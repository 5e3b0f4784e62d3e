"""Command line: parses arguments, calls one library function per command, prints. Nothing else lives here.

torch, transformers and peft are imported inside the commands so `meraser --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from meraser.utils import MeraserError
from meraser.utils import console as _console

app = typer.Typer(
    help="MEraser: erase backdoor fingerprints from LLMs, embed fingerprints to test it, and evaluate both.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = "Hugging Face id, local model or adapter folder, or the embedded default 'smollm2-135m'"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _train_config(config: Optional[Path], overrides: dict):
    from meraser.config import load_yaml
    from meraser.training import TrainConfig

    base = load_yaml(config) if config else {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.from_dict(base, where=str(config) if config else "train")


@app.command()
def train(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option("chitchat", "--data", "-d", help="JSON/JSONL file, 'chitchat' (offline default) or hf:DATASET_ID"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (adapter, or model for full/--merge)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with TrainConfig fields; flags override it"),
    method: Optional[str] = typer.Option(None, help="lora or full"),
    epochs: Optional[float] = typer.Option(None, help="training epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate"),
    batch_size: Optional[int] = typer.Option(None, help="rows per device per step"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank"),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha"),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated LoRA target modules, e.g. q_proj,v_proj"),
    template: Optional[str] = typer.Option(None, help="chat, raw, or a custom '{prompt} ... {response}' template"),
    loss_on: Optional[str] = typer.Option(None, help="response (default) or all"),
    prompt_field: Optional[str] = typer.Option(None, help="prompt field name in the data file"),
    response_field: Optional[str] = typer.Option(None, help="response field name in the data file"),
    limit: Optional[int] = typer.Option(None, help="use only the first N rows"),
    merge: bool = typer.Option(False, help="merge the LoRA adapter and save a full model"),
    resume: bool = typer.Option(False, help="continue an interrupted run from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Fine-tune a model (LoRA or full) on instruction pairs: the routine every MEraser phase uses."""
    from meraser.training import train_from_source

    _quiet_libraries()
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
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    card: Optional[Path] = typer.Option(None, help="fingerprint card: also report FSR and false positives"),
    ppl: Optional[str] = typer.Option(None, help="perplexity text: .txt/.json/.jsonl file or hf:NAME[:CONFIG]"),
    text_field: Optional[str] = typer.Option(None, help="dotted path of the text in a JSON file (SQuAD: data.paragraphs.context)"),
    ppl_windows: int = typer.Option(200, help="at most this many 512-token windows"),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", "-t", help="lm-eval task name or BIG-bench task.json/folder; repeat"),
    limit: Optional[int] = typer.Option(None, help="examples per task"),
    batch_size: int = typer.Option(8, help="batch size"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Evaluate a model: FSR (with --card), perplexity (--ppl) and zero-shot accuracy (--tasks, via lm-eval)."""
    import json

    from meraser.evaluation.evaluate import EvalConfig, evaluate as run_eval, results_table

    _quiet_libraries()
    tasks = [t for arg in tasks or [] for t in arg.split(",") if t]
    cfg = EvalConfig.from_dict({"ppl": ppl, "text_field": text_field, "ppl_windows": ppl_windows, "tasks": tasks,
                                "limit": limit, "batch_size": batch_size})
    res = run_eval(model, cfg, str(card) if card else None, trust_remote_code=trust_remote_code, progress=not json_out)
    if json_out:
        print(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        _console().print(results_table([res], title=f"meraser evaluate ({res['seconds']} s)"))


def _parse_sets(sets: Optional[List[str]]) -> dict:
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MeraserError(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def fingerprint(
    method: str = typer.Option(..., "--method", help="if-sft, utf or chain-hash"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model/ plus the secret fingerprint_card.json"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="method config field, e.g. --set epochs=3; repeat"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Embed a backdoor fingerprint (the defender's side) and report FSR and false-positive rate."""
    import json

    from meraser.fingerprints.embed import fingerprint as run

    _quiet_libraries()
    s = run(method, model, out, _parse_sets(set_), overwrite=overwrite, trust_remote_code=trust_remote_code)
    if json_out:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return
    _console().print(
        f"[green]{method}[/] fingerprint in {out}/model, card {out}/fingerprint_card.json (keep it secret)\n"
        f"FSR {s['fsr']:.1%}  false positives {s['false_positive_rate']:.1%}  "
        f"training {s['train']['seconds']} s on {s['rows']} rows"
    )


@app.command()
def verify(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + " (a fingerprint output folder works too)"),
    card: Path = typer.Option(..., "--card", help="fingerprint card JSON (or the folder holding it)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Check a suspect model against a fingerprint card: FSR, false-positive rate, per-trigger outputs."""
    import json

    from rich.table import Table

    from meraser.fingerprints.embed import model_dir, verify as run

    _quiet_libraries()
    r = run(model_dir(model), card, trust_remote_code=trust_remote_code)
    if json_out:
        print(json.dumps(r, indent=2, ensure_ascii=False))
        return
    t = Table(title=f"{r['method']}: FSR {r['fsr']:.1%}, false positives {r['false_positive_rate']:.1%}")
    for col in ("trigger", "target", "output", "match"):
        t.add_column(col, overflow="fold")
    for row in r["per_trigger"]:
        t.add_row(row["trigger"][:60], row["target"], row["output"][:80], "yes" if row["match"] else "no")
    _console().print(t)


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="the user message"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(128, help="tokens to generate"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
):
    """Answer one prompt with a model's chat template (greedy)."""
    from meraser.generation import generate
    from meraser.models import load_model

    _quiet_libraries()
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    print(generate(m, tok, [prompt], max_new_tokens=max_new_tokens)[0])


def _print_rows(rows: list[dict], title: str) -> None:
    from meraser.evaluation.evaluate import results_table

    console = _console()
    console.print(results_table(rows, title=title))
    for r in rows:
        if r.get("fsr_per_epoch"):
            curve = "  ".join(f"e{p['epoch']}:{p['fsr']:.0%}" for p in r["fsr_per_epoch"])
            console.print(f"  FSR per epoch while {r['stage'].replace('ed', 'ing')}: {curve}")
        if "erased" in r:
            console.print(f"  Algorithm 1 verify after {r['stage']}: erased={r['erased']} "
                          f"(ordinary accuracy {r['ordinary_accuracy']:.0%} vs {r['reference_accuracy']:.0%} before)")


def _write_run_report(run_dir: str) -> None:
    from meraser.report import write_report

    _console().print(f"report: {write_report([run_dir], Path(run_dir) / 'report.html')}")


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="experiment YAML (see examples/)"),
    out: Optional[Path] = typer.Option(None, help="override the experiment's output folder"),
):
    """Fingerprint -> erase -> recover, evaluating every stage; re-running resumes finished stages."""
    from meraser.erase.pipeline import load_experiment, run_experiment

    _quiet_libraries()
    exp = load_experiment(experiment)
    if out:
        exp.out = str(out)
    rows = run_experiment(exp, console=_console())
    _print_rows(rows, f"MEraser on {exp.model} ({exp.fingerprint.existing or exp.fingerprint.method})")
    _write_run_report(exp.out)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="output folder (re-running resumes)")):
    """The main job on the embedded SmolLM2-135M: fingerprint (UTF), erase, recover; FSR and PPL at each stage."""
    import time

    from meraser.erase.pipeline import demo_experiment, run_experiment

    _quiet_libraries()
    exp = demo_experiment(str(out))
    console = _console()
    console.print(
        f"[bold]meraser demo[/]: {exp.model}, UTF fingerprint; erase LoRA r={16} q/v on {exp.mismatched.n} mismatched "
        f"chitchat rows x {exp.erase.overrides['epochs']} epochs (lr 1e-3); recover on {exp.clean.n} clean rows x "
        f"{exp.recover.overrides['epochs']} epoch; PPL on {exp.eval.ppl_windows} held-out chitchat responses. "
        f"Sized for ~15 min on 2 CPU cores; outputs in {out}."
    )
    t = time.perf_counter()
    rows = run_experiment(exp, console=console)
    _print_rows(rows, f"MEraser demo ({time.perf_counter() - t:.0f} s)")
    _write_run_report(exp.out)


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="run folders written by `meraser run` / `meraser demo`"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: str = typer.Option("MEraser report", help="page title"),
):
    """One HTML page for finished runs: Table 1, FSR per erase/recover epoch (plot), per-trigger outputs."""
    from meraser.report import write_report

    _console().print(f"[green]report[/] written to {write_report(runs, out, title)}")


transfer_app = typer.Typer(help="Transferable erasure: train the erase adapter once on a clean base, apply it anywhere.")
app.add_typer(transfer_app, name="transfer")


@transfer_app.command("train")
def transfer_train(
    base: str = typer.Option("smollm2-135m", "--base", help="clean base model the fingerprinted models derive from"),
    data: str = typer.Option("chitchat", help="instruction source for the mismatched set (or a ready mismatched file with --ready-made)"),
    out: Path = typer.Option(..., "--out", "-o", help="adapter output folder"),
    n: int = typer.Option(300, help="mismatched rows"),
    ready_made: bool = typer.Option(False, help="use --data as the finished mismatched set"),
    epochs: Optional[float] = typer.Option(None, help="erase epochs (default: paper preset)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Train the MEraser erase adapter on a clean base model (section 4.3)."""
    from meraser.erase.meraser import transfer_train as run

    _quiet_libraries()
    res = run(base, data, out, n=n, ready_made=ready_made, overrides={"epochs": epochs} if epochs else None,
              overwrite=overwrite)
    _console().print(f"[green]erase adapter[/] saved to {res.output_dir} ({res.metrics['seconds']} s)")


@transfer_app.command("apply")
def transfer_apply(
    adapter: Path = typer.Option(..., help="erase adapter from `meraser transfer train`"),
    model: str = typer.Option(..., "--model", "-m", help="fingerprinted model (same architecture as the adapter's base)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the merged model"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Merge a transferable erase adapter into a fingerprinted model: no training per victim."""
    from meraser.erase.meraser import transfer_apply as run
    from meraser.fingerprints.embed import model_dir

    _quiet_libraries()
    _console().print(f"[green]erased model[/] saved to {run(adapter, model_dir(model), out, overwrite=overwrite)}")


def main() -> None:
    try:
        app()
    except MeraserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; re-run with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
