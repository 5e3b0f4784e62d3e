"""MEraser's commands: `erase`, `recover`, `transfer train|apply`, and `run` / `demo` over them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from meraser.cli.common import (
    MODEL_HELP,
    Overwrite,
    Resume,
    TrustRemoteCode,
    app,
    parse_sets,
    quiet_libraries,
)
from meraser.models import DEFAULT_MODEL
from meraser.utils import console as _console


def _print_rows(rows: list[dict], title: str) -> None:
    from meraser.evaluation.evaluate import results_table

    console = _console()
    console.print(results_table(rows, title=title))
    for r in rows:
        if r.get("fsr_per_epoch"):
            curve = "  ".join(f"e{p['epoch']}:{p['fsr']:.0%}" for p in r["fsr_per_epoch"])
            console.print(f"  FSR per epoch while {r['stage'].replace('ed', 'ing')}: {curve}")
        if "erased" in r:
            verdict = "needs a card for its FSR half" if r["erased"] is None else f"erased={r['erased']}"
            console.print(f"  Algorithm 1 verify after {r['stage']}: {verdict} "
                          f"(ordinary accuracy {r['ordinary_accuracy']:.0%}, bar {r['utility_bar']:.0%} "
                          f"from the {r['utility_bar_from']} model)")


def _write_run_report(run_dir: str) -> None:
    from meraser.report import write_report

    _console().print(f"report: {write_report([run_dir], Path(run_dir) / 'report.html')}")


@app.command()
def run(
    experiment: Path = typer.Argument(..., help="experiment YAML (see examples/)"),
    out: Optional[Path] = typer.Option(None, help="override the experiment's output folder",
                                       show_default="the YAML's `out`"),
    overwrite: bool = typer.Option(False, help="redo the stages whose settings changed (and the stages after them)"),
):
    """Fingerprint (or take an existing model, with or without its card) -> erase -> recover, evaluating every
    stage. The whole file is checked first; re-running resumes finished stages and refuses stale ones."""
    from meraser.runner import load_experiment, run_experiment

    quiet_libraries()
    exp = load_experiment(experiment)
    if out:
        exp.out = str(out)
    rows = run_experiment(exp, where=f"{experiment}: ", overwrite=overwrite, console=_console())
    _print_rows(rows, f"{exp.attack.method if exp.attack else 'MEraser'} on "
                      f"{exp.fingerprint.existing or exp.model or DEFAULT_MODEL} "
                      f"({'existing model' if exp.fingerprint.existing else exp.fingerprint.method})")
    _write_run_report(exp.out)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (re-running resumes)"),
    overwrite: bool = typer.Option(False, help="redo stages made with other settings"),
):
    """The main job on the embedded SmolLM2-135M: fingerprint (UTF), erase, recover; FSR and PPL at each stage."""
    import time

    from meraser.erase.meraser import preset
    from meraser.runner import DEMO_MEASURED, demo_experiment, run_experiment

    quiet_libraries()
    exp = demo_experiment(str(out))
    e = preset("erase", exp.erase.preset, exp.erase.overrides)
    r = preset("recover", exp.recover.preset, exp.recover.overrides)
    console = _console()
    console.print(
        f"[bold]meraser demo[/]: SmolLM2-135M, UTF fingerprint; erase LoRA r={e.lora.r} on "
        f"{'/'.join(e.lora.target_modules)} with {exp.mismatched.n} mismatched chitchat rows x {e.epochs:g} epochs "
        f"(lr {e.learning_rate:g}); recover on {exp.clean.n} clean rows (half of them questions the model writes "
        f"and answers itself) x {r.epochs:g} epochs; PPL on "
        f"{exp.eval.ppl_windows} held-out chitchat responses. It takes {DEMO_MEASURED}; outputs in {out}."
    )
    t = time.perf_counter()
    rows = run_experiment(exp, where="demo: ", overwrite=overwrite, console=console)
    _print_rows(rows, f"MEraser demo ({time.perf_counter() - t:.0f} s)")
    _write_run_report(exp.out)


def _preset_default() -> str:
    from meraser.erase.meraser import DEFAULT_PRESET

    return DEFAULT_PRESET


def _preset_help() -> str:
    from meraser.erase.meraser import ERASE_PRESETS

    return ", ".join(ERASE_PRESETS) + " (README: what each is, as measured)"


def _data_default(set_cls: str, name: str):
    from meraser.erase import datasets

    return getattr(getattr(datasets, set_cls)(), name)


def _magpie_default() -> str:
    from meraser.erase.datasets import AUTO_MAGPIE

    return f"{AUTO_MAGPIE} with --writer (and a chat template), else 0"


# erase, recover and transfer train choose a preset and set TrainConfig fields over it the same way, and read their
# rows the same way (erase and transfer train: the same mismatched set)
PresetName = Annotated[str, typer.Option("--preset", help=_preset_help())]
PhaseSets = Annotated[Optional[List[str]], typer.Option(
    "--set", help="TrainConfig field over the preset, e.g. --set epochs=3 --set lora.r=8; repeat",
    show_default="the preset's")]
ReadyMade = Annotated[bool, typer.Option(help="use the first N rows of --data as they are")]
MismatchedSource = Annotated[str, typer.Option(
    "--data", "-d", help="instruction source the mismatched set is built from (or a finished set with --ready-made): "
                         "JSON/JSONL file, 'chitchat' or hf:ID")]
MismatchedRows = Annotated[int, typer.Option(min=2, help="mismatched rows (paper: 300)")]
Adapter = Annotated[bool, typer.Option(help="save only the phase's LoRA adapter, not the merged model")]


def _phase_summary(kind: str, s: dict) -> None:
    m = s["metrics"]
    what = "adapter" if s["adapter"] else "model"
    _console().print(f"[green]{kind}[/] {what} saved to {s['out']}: {s['rows']} rows, {s['preset']} preset, "
                     f"{m['steps']} steps in {m['seconds']} s, mean loss {m['train_loss']:.3f}")


@app.command()
def erase(
    model: str = typer.Option(..., "--model", "-m", help="the suspect model: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: the erased model (or adapter with --adapter)"),
    data: MismatchedSource = _data_default("MismatchedSet", "source"),
    n: MismatchedRows = _data_default("MismatchedSet", "n"),
    ready_made: ReadyMade = False,
    by_type: bool = typer.Option(_data_default("MismatchedSet", "by_type"),
                                 help="answer each question with a response to a question of another type"),
    seed: int = typer.Option(_data_default("MismatchedSet", "seed"), help="seed for the mismatched set"),
    preset_name: PresetName = _preset_default(),
    set_: PhaseSets = None,
    adapter: Adapter = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Erase whatever fingerprint a model carries, with no card: LoRA on a mismatched set (MEraser phase 1)."""
    from meraser.erase.datasets import MismatchedSet
    from meraser.erase.meraser import erase_model

    quiet_libraries()
    sets = MismatchedSet.from_dict({"source": data, "n": n, "ready_made": ready_made, "by_type": by_type,
                                    "seed": seed}, where="erase")
    _phase_summary("erase", erase_model(model, out, data=sets, preset_name=preset_name, overrides=parse_sets(set_),
                                        adapter=adapter, overwrite=overwrite, resume=resume,
                                        trust_remote_code=trust_remote_code))


@app.command()
def recover(
    model: str = typer.Option(..., "--model", "-m", help="the erased model (from `meraser erase`, or any model)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: the recovered model (or adapter with --adapter)"),
    data: str = typer.Option(_data_default("CleanSet", "source"), "--data", "-d",
                             help="instruction source of the clean set: JSON/JSONL file, 'chitchat' or hf:ID"),
    n: int = typer.Option(_data_default("CleanSet", "n"), min=1, help="clean rows (paper: 600)"),
    ready_made: ReadyMade = False,
    self_answers: bool = typer.Option(False, help="answer the clean prompts with the model's own answers"),
    magpie: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                           help="share of the rows --writer (else --model) writes and answers itself "
                                                "(Magpie-style, offline); 0: the paper's recovery",
                                           show_default=_magpie_default()),
    replay_mismatched: int = typer.Option(_data_default("CleanSet", "replay_mismatched"), min=0,
                                          help="erase rows mixed in (--model must come from `meraser erase`)"),
    writer: Optional[str] = typer.Option(None, help="the model as it was before the erase (the erased one has lost "
                                                    "its short answers): it writes and answers the --magpie / "
                                                    "--self-answers rows, and with it half the rows are Magpie's by "
                                                    "default (Algorithm 1 then passes offline; README)",
                                         show_default="--model, and no Magpie rows"),
    seed: int = typer.Option(_data_default("CleanSet", "seed"), help="seed for the clean set"),
    preset_name: PresetName = _preset_default(),
    set_: PhaseSets = None,
    adapter: Adapter = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Restore an erased model's utility: LoRA on a clean set (MEraser phase 2), disjoint from the erase rows."""
    from meraser.erase.datasets import CleanSet
    from meraser.erase.meraser import recover_model

    quiet_libraries()
    sets = CleanSet.from_dict({"source": data, "n": n, "ready_made": ready_made, "self_answers": self_answers,
                               "magpie": magpie, "replay_mismatched": replay_mismatched, "seed": seed},
                              where="recover")
    _phase_summary("recover", recover_model(model, out, data=sets, preset_name=preset_name,
                                            overrides=parse_sets(set_), adapter=adapter, overwrite=overwrite,
                                            resume=resume, trust_remote_code=trust_remote_code, writer=writer))


transfer_app = typer.Typer(help="Transferable erasure: train the erase adapter once on a clean base, apply it "
                                "anywhere.")
app.add_typer(transfer_app, name="transfer")


@transfer_app.command("train")
def transfer_train(
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="clean base model the fingerprinted models derive from"),
    out: Path = typer.Option(..., "--out", "-o", help="adapter output folder"),
    data: MismatchedSource = _data_default("MismatchedSet", "source"),
    n: MismatchedRows = _data_default("MismatchedSet", "n"),
    ready_made: ReadyMade = False,
    preset_name: PresetName = _preset_default(),
    set_: PhaseSets = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Train the MEraser erase adapter on a clean base model (section 4.3)."""
    from meraser.erase.datasets import MismatchedSet
    from meraser.erase.transfer import transfer_train as run

    quiet_libraries()
    sets = MismatchedSet.from_dict({"source": data, "n": n, "ready_made": ready_made}, where="transfer train")
    res = run(base, out, data=sets, preset_name=preset_name, overrides=parse_sets(set_), overwrite=overwrite,
              resume=resume)
    _console().print(f"[green]erase adapter[/] saved to {res.output_dir} ({res.metrics['seconds']} s)")


@transfer_app.command("apply")
def transfer_apply(
    adapter: Path = typer.Option(..., help="erase adapter from `meraser transfer train`"),
    model: str = typer.Option(..., "--model", "-m",
                              help="fingerprinted model (same architecture as the adapter's base)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the merged model"),
    overwrite: Overwrite = False,
):
    """Merge a transferable erase adapter into a fingerprinted model: no training per victim."""
    from meraser.erase.transfer import transfer_apply as run
    from meraser.fingerprints.embed import model_dir

    quiet_libraries()
    _console().print(f"[green]erased model[/] saved to {run(adapter, model_dir(model), out, overwrite=overwrite)}")
