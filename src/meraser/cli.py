"""Command line: parses arguments, calls one library function per command, prints. Nothing else lives here.

torch, transformers and peft are imported inside the commands so `meraser --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from meraser import terminal
from meraser.models import ALIASES, DEFAULT_MODEL
from meraser.utils import MeraserError
from meraser.utils import console as _console

app = typer.Typer(
    help="MEraser: erase backdoor fingerprints from LLMs, embed fingerprints to test it, and evaluate both.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (f"Hugging Face id, local model or adapter folder, or an embedded model "
              f"({', '.join(ALIASES)}; the default is {DEFAULT_MODEL})")


def _default(config_cls, path: str) -> str:
    """A config field's default as text, for `--help`: every default lives in its config class only."""
    node = config_cls()
    for part in path.split("."):
        node = getattr(node, part)
    return ",".join(node) if isinstance(node, list) else str(node)


def _decoys_default() -> str:
    from meraser.evaluation.likelihood import FEW_DECOYS, MANY_DECOYS

    return f"{FEW_DECOYS} where the card has keys enough for an exact p-value far below the level, else {MANY_DECOYS}"


def _endpoint_default(name: str) -> str:
    from meraser.evaluation.served import EndpointConfig

    return _default(EndpointConfig, name)


def _eval_default(name: str):
    from meraser.evaluation.evaluate import EvalConfig

    return getattr(EvalConfig(), name)


def _train_default(path: str) -> str:
    from meraser.training import TrainConfig

    return _default(TrainConfig, path)


# options several commands share, declared once (the default is each parameter's own `= ...`)
TrustRemoteCode = Annotated[bool, typer.Option(help="allow model code from the hub (off by default)")]
Overwrite = Annotated[bool, typer.Option(help="replace an existing output folder (never an input; README: "
                                              "\"Your data\")")]
Resume = Annotated[bool, typer.Option(help="continue an interrupted run from its last checkpoint (made with the "
                                           "same settings and rows)")]
JsonOut = Annotated[bool, typer.Option("--json", help="print JSON")]

# `verify` and `chat` decode under the same attack options
DecodingAttack = Annotated[Optional[str], typer.Option(
    "--attack", help="decode under a decoding-time attack (cleangen, token-forcing)",
    show_default="plain greedy decoding")]
DecodingAttackSettings = Annotated[Optional[List[str]], typer.Option(
    "--set", help="attack setting, e.g. --set reference=smollm2-135m; repeat", show_default="the attack's defaults")]


def _fingerprint_methods() -> str:
    from meraser.fingerprints import REGISTRY  # light: no torch at import

    return "one of: " + ", ".join(REGISTRY)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _set_path(tree: dict, key: str, value) -> None:
    """Set a dotted key in nested dicts: lora.r=8 -> {"lora": {"r": 8}}."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _train_config(config: Optional[Path], overrides: dict):
    from meraser.config import load_yaml
    from meraser.training import TrainConfig

    base = load_yaml(config) if config else {}
    for key, value in overrides.items():
        if value is not None:
            _set_path(base, key, value)
    return TrainConfig.from_dict(base, where=str(config) if config else "train")


@app.command()
def train(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option("chitchat", "--data", "-d", help="JSON/JSONL file, 'chitchat' (offline default) or hf:DATASET_ID"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (adapter, or model for full/--merge)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with TrainConfig fields; flags override it",
                                          show_default="none"),
    method: Optional[str] = typer.Option(None, help="lora or full", show_default=_train_default("method")),
    epochs: Optional[float] = typer.Option(None, help="training epochs", show_default=_train_default("epochs")),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate", show_default=_train_default("learning_rate")),
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
        _set_path(out, key.strip(), yaml.safe_load(value))
    return out


@app.command()
def fingerprint(
    method: str = typer.Option(..., "--method", help=_fingerprint_methods()),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model/ plus the secret fingerprint_card.json"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="method config field, e.g. --set epochs=3; repeat",
                                             show_default="the method's defaults"),
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
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
        f"training {s['train']['seconds']} s on {s['rows']} rows\n"
        f"card checksum (publish it to commit to this card without showing it): {_card_checksum(out)}"
    )


def _card_checksum(folder: Path) -> str:
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import CARD_FILE

    return Card.load(folder / CARD_FILE).checksum


@app.command()
def verify(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (a fingerprint output folder "
                                        "works too)", show_default="none: --endpoint instead"),
    card: Path = typer.Option(..., "--card", help="fingerprint card JSON (or the folder holding it)"),
    attack: DecodingAttack = None,
    set_: DecodingAttackSettings = None,
    reference: Optional[str] = typer.Option(None, "--reference", help="a model known not to carry the fingerprint "
                                            "(e.g. the base): gives the ownership p-value",
                                            show_default="no p-value"),
    test: str = typer.Option("paper", "--test", help="paper (greedy answers must contain the target: FSR), strict "
                             "(forced prefix, sampling, paraphrases, log-likelihood, partial match) or likelihood "
                             "(the card's keys against decoy keys: an ownership p-value without a base model)"),
    strict: bool = typer.Option(False, "--strict", help="the same as --test strict"),
    base: Optional[str] = typer.Option(None, "--base", help="with --test strict or likelihood: the clean base model, "
                                       "compared with beside the suspect", show_default="no comparison"),
    decoys: Optional[int] = typer.Option(None, min=1, help="with --test likelihood: decoy keys per key (fewer "
                                         "where the method has fewer)",
                                         show_default=_decoys_default()),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="a served suspect: its OpenAI-compatible base URL "
                                           "(http://host:port/v1), instead of --model", rich_help_panel="Served model"),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="the model name the server serves",
                                               show_default="the only one it lists", rich_help_panel="Served model"),
    api: Optional[str] = typer.Option(None, "--api", help="chat (the server's template; no prefill) or completions "
                                      "(the prompt rendered here with the owner's tokenizer, prefill included)",
                                      show_default=_endpoint_default("api"), rich_help_panel="Served model"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="the owner's tokenizer (renders prompts, draws "
                                            "probes)", show_default="the card's base model",
                                            rich_help_panel="Served model"),
    concurrency: Optional[int] = typer.Option(None, min=1, help="requests in flight at once",
                                              show_default=_endpoint_default("concurrency"),
                                              rich_help_panel="Served model"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="environment variable holding the API key "
                                              "(never printed)", show_default=_endpoint_default("api_key_env"),
                                              rich_help_panel="Served model"),
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Check a suspect model against a fingerprint card: FSR, false-positive rate, per-trigger outputs; or the strict
    checks, or the likelihood ownership test (--test). A served suspect (--endpoint) gets the checks its API allows."""
    from meraser.evaluation.verifications import verify_suspect

    _quiet_libraries()
    test = "strict" if strict else test
    given = {"url": endpoint, "model": served_model, "api": api, "tokenizer": tokenizer, "concurrency": concurrency,
             "api_key_env": api_key_env}
    r = verify_suspect(card, test, model=model,
                       endpoint={k: v for k, v in given.items() if v is not None} if endpoint else None, base=base,
                       reference=reference, decoys=decoys, attack=attack, attack_settings=_parse_sets(set_),
                       trust_remote_code=trust_remote_code, progress=not json_out)
    terminal.show(r, json_out, test)


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

    _quiet_libraries()
    prepared = None
    if attack:
        from meraser.attacks.base import prepare_decoding

        prepared = prepare_decoding(attack, _parse_sets(set_), model)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    decoding = prepared[0].decoding(m, tok, *prepared[1:]) if prepared else None
    print(generate(m, tok, [prompt], max_new_tokens=max_new_tokens, decoding=decoding)[0])


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

    _quiet_libraries()
    exp = load_experiment(experiment)
    if out:
        exp.out = str(out)
    rows = run_experiment(exp, where=f"{experiment}: ", overwrite=overwrite, console=_console())
    _print_rows(rows, f"{exp.attack.method if exp.attack else 'MEraser'} on "
                      f"{exp.fingerprint.existing or exp.model or DEFAULT_MODEL} "
                      f"({'existing model' if exp.fingerprint.existing else exp.fingerprint.method})")
    _write_run_report(exp.out)


@app.command()
def bench(
    matrix: Path = typer.Argument(..., help="matrix YAML: models, fingerprints, attacks, seeds, grid "
                                            "(benchmarks/matrix_*.yaml)"),
    out: Optional[Path] = typer.Option(None, help="override the matrix's output folder",
                                       show_default="the YAML's `out`"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and which are done; run nothing"),
    only: Optional[List[str]] = typer.Option(None, help="run only the cells whose id contains this text (e.g. an "
                                                        "attack or fingerprint name); repeat for several",
                                             show_default="every cell"),
    executor: str = typer.Option("sequential", help="sequential (here, one cell after another) or ray (each cell "
                                                    "a Ray task: pip install 'meraser\\[ray]')"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (e.g. auto)",
                                          show_default="a local Ray instance"),
    cpus_per_cell: float = typer.Option(1.0, help="CPUs each Ray task asks for"),
    gpus_per_cell: float = typer.Option(0.0, help="GPUs each Ray task asks for (1 on a GPU machine)"),
    redo_stale: bool = typer.Option(False, "--redo-stale", help="run again the finished cells that today's defaults "
                                                                "would make differently (refused otherwise)"),
    reverify: bool = typer.Option(False, "--reverify", help="measure on finished cells' stored models (made again "
                                  "where not kept) the verifications registered since they ran"),
):
    """Run a fingerprint x attack matrix: every cell an experiment in its own folder, fingerprinted models and
    MEraser's transfer adapter made once and shared, one results store. Re-running skips finished cells."""
    from meraser.bench import Executor, load_matrix, run_bench

    _quiet_libraries()
    m = load_matrix(matrix)
    if out:
        m.out = str(out)
    res = run_bench(m, where=f"{matrix}: ", dry_run=dry_run, only=only, console=_console(200),
                    executor=Executor(executor, address, cpus_per_cell, gpus_per_cell), redo_stale=redo_stale,
                    reverify=reverify)
    if not dry_run:
        from meraser.report import write_bench_report

        page = write_bench_report(m.out, Path(m.out) / "report.html")
        _console().print(f"{res['ran']} cells run, {res['done']} were done already"
                         + (f" ({res['reverified']} re-verified)" if reverify else "") + f", {len(res['failed'])} failed "
                         f"(see {m.out}/failed.jsonl; a re-run retries them); results: {m.out}/results.jsonl; "
                         f"report: {page}")
    if res["failed"]:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (re-running resumes)"),
    overwrite: bool = typer.Option(False, help="redo stages made with other settings"),
):
    """The main job on the embedded SmolLM2-135M: fingerprint (UTF), erase, recover; FSR and PPL at each stage."""
    import time

    from meraser.erase.meraser import preset
    from meraser.runner import DEMO_MEASURED, demo_experiment, run_experiment

    _quiet_libraries()
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


# erase, recover and transfer train choose a preset and set TrainConfig fields over it the same way
PresetName = Annotated[str, typer.Option("--preset", help=_preset_help())]
PhaseSets = Annotated[Optional[List[str]], typer.Option(
    "--set", help="TrainConfig field over the preset, e.g. --set epochs=3 --set lora.r=8; repeat",
    show_default="the preset's")]


def _phase_summary(kind: str, s: dict) -> None:
    m = s["metrics"]
    what = "adapter" if s["adapter"] else "model"
    _console().print(f"[green]{kind}[/] {what} saved to {s['out']}: {s['rows']} rows, {s['preset']} preset, "
                     f"{m['steps']} steps in {m['seconds']} s, mean loss {m['train_loss']:.3f}")


@app.command()
def erase(
    model: str = typer.Option(..., "--model", "-m", help="the suspect model: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: the erased model (or adapter with --adapter)"),
    data: str = typer.Option(_data_default("MismatchedSet", "source"), "--data", "-d",
                             help="instruction source the mismatched set is built from (or a finished set with "
                                  "--ready-made): JSON/JSONL file, 'chitchat' or hf:ID"),
    n: int = typer.Option(_data_default("MismatchedSet", "n"), min=2, help="mismatched rows (paper: 300)"),
    ready_made: bool = typer.Option(False, help="use the first N rows of --data as they are"),
    by_type: bool = typer.Option(_data_default("MismatchedSet", "by_type"),
                                 help="answer each question with a response to a question of another type"),
    seed: int = typer.Option(_data_default("MismatchedSet", "seed"), help="seed for the mismatched set"),
    preset_name: PresetName = _preset_default(),
    set_: PhaseSets = None,
    adapter: bool = typer.Option(False, help="save only the erase LoRA adapter, not the merged model"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Erase whatever fingerprint a model carries, with no card: LoRA on a mismatched set (MEraser phase 1)."""
    from meraser.erase.datasets import MismatchedSet
    from meraser.erase.meraser import erase_model

    _quiet_libraries()
    sets = MismatchedSet.from_dict({"source": data, "n": n, "ready_made": ready_made, "by_type": by_type,
                                    "seed": seed}, where="erase")
    _phase_summary("erase", erase_model(model, out, data=sets, preset_name=preset_name, overrides=_parse_sets(set_),
                                        adapter=adapter, overwrite=overwrite, resume=resume,
                                        trust_remote_code=trust_remote_code))


@app.command()
def recover(
    model: str = typer.Option(..., "--model", "-m", help="the erased model (from `meraser erase`, or any model)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: the recovered model (or adapter with --adapter)"),
    data: str = typer.Option(_data_default("CleanSet", "source"), "--data", "-d",
                             help="instruction source of the clean set: JSON/JSONL file, 'chitchat' or hf:ID"),
    n: int = typer.Option(_data_default("CleanSet", "n"), min=1, help="clean rows (paper: 600)"),
    ready_made: bool = typer.Option(False, help="use the first N rows of --data as they are"),
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
    adapter: bool = typer.Option(False, help="save only the recovery LoRA adapter, not the merged model"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Restore an erased model's utility: LoRA on a clean set (MEraser phase 2), disjoint from the erase rows."""
    from meraser.erase.datasets import CleanSet
    from meraser.erase.meraser import recover_model

    _quiet_libraries()
    sets = CleanSet.from_dict({"source": data, "n": n, "ready_made": ready_made, "self_answers": self_answers,
                               "magpie": magpie, "replay_mismatched": replay_mismatched, "seed": seed},
                              where="recover")
    _phase_summary("recover", recover_model(model, out, data=sets, preset_name=preset_name,
                                            overrides=_parse_sets(set_), adapter=adapter, overwrite=overwrite,
                                            resume=resume, trust_remote_code=trust_remote_code, writer=writer))


@app.command()
def card(
    triggers: Path = typer.Option(..., help="triggers: a text file (one per line) or a JSON list of strings"),
    targets: Path = typer.Option(..., help="targets, same format; line i answers trigger i"),
    out: Path = typer.Option(..., "--out", "-o", help="card file to write (JSON, owner-only permissions)"),
    match: str = typer.Option("substring", help="substring (the output contains the target) or exact"),
    method: str = typer.Option("custom", help="a name for the fingerprint's method, shown in reports"),
    base_model: Optional[str] = typer.Option(None, help="the model the fingerprint was planted in (the 'base' row "
                                             "of `meraser run`)", show_default="none"),
    template: str = typer.Option("chat", help="how triggers are rendered: chat, raw or a custom template"),
    system_prompt: Optional[str] = typer.Option(None, help="system prompt used when verifying",
                                                show_default="the template's"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="greedy decoding length for verification",
                                                 show_default="enough for the longest target"),
    decoys: Optional[Path] = typer.Option(None, help="decoy targets for the likelihood ownership test: targets drawn "
                                          "the way the real ones were, never planted (a text file, one per line, "
                                          "or a JSON list)", show_default="none: no likelihood test"),
    overwrite: bool = typer.Option(False, help="replace an existing card"),
):
    """Make a fingerprint card from your own triggers and targets (a fingerprint planted elsewhere)."""
    from meraser.fingerprints.card import card_from_files

    c = card_from_files(triggers, targets, out, method=method, match=match, base_model=base_model, template=template,
                        system_prompt=system_prompt, max_new_tokens=max_new_tokens, overwrite=overwrite,
                        decoys=decoys)
    _console().print(f"[green]card[/] {out}: {len(c.triggers)} triggers, match {c.match}, max_new_tokens "
                     f"{c.max_new_tokens} (keep it secret; verify with `meraser verify --card {out}`)\n"
                     f"checksum (publish it to commit to this card without showing it): {c.checksum}")


def _attack_help() -> str:
    from meraser.attacks import REGISTRY

    lines = "\n\n".join(f"[bold]{name}[/]: {a.summary}" for name, a in REGISTRY.items())
    return ("Run one erasure attack on a (fingerprinted) model and save the attacked model, which `verify`, "
            "`evaluate` and `chat` load unchanged; a decoding-time attack (cleangen, token-forcing, the adaptive "
            "suppress-*, detect-topk and perplexity-filter) changes no weight and saves its record instead, for `verify --attack` and `chat --attack`. Settings: --set "
            "KEY=VALUE (the attack's config fields).\n\n"
            + lines)


@app.command(help=_attack_help())
def attack(
    method: str = typer.Option(..., "--method", help="registered attack name (listed above)"),
    model: str = typer.Option(..., "--model", "-m", help="the model to attack: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the attacked model (a decoding-time "
                             "attack writes its record and extracted sequences there instead)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="attack setting, e.g. --set sparsity=0.3; repeat",
                                             show_default="the attack's defaults"),
    base: Optional[str] = typer.Option(None, help="the base model the attacked model derives from (merging, "
                                       "transfer)", show_default="the base recorded with the model"),
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
):
    import json

    from meraser.attacks import run_attack
    from meraser.fingerprints.embed import model_dir

    _quiet_libraries()
    s = run_attack(method, model_dir(model), out, _parse_sets(set_), base=base, overwrite=overwrite,
                   progress=not json_out, trust_remote_code=trust_remote_code)
    if json_out:
        print(json.dumps(s, indent=2, ensure_ascii=False, default=str))
        return
    details = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("attack", "config", "out", "seconds", "base"))
    what = "attack record" if (Path(s["out"]) / "attack.json").exists() else "model"
    _console().print(f"[green]{method}[/] {what} saved to {s['out']} in {s['seconds']} s" +
                     (f" ({details})" if details else ""))


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="run folders written by `meraser run` / `meraser demo`, or "
                                                "`meraser bench` folders (several read as one matrix)"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: Optional[str] = typer.Option(None, help="page title (default: 'MEraser report', or 'meraser bench' "
                                                   "for a bench folder)"),
    show_secrets: bool = typer.Option(False, help="print the card's triggers, targets and matching outputs (hashed "
                                                  "by default: a report is made to be shared)"),
    markdown: Optional[Path] = typer.Option(None, help="also write the tables as Markdown to this file"),
    figures: Optional[Path] = typer.Option(None, help="also write the page's figures as PNG files into this folder"),
    overwrite: bool = typer.Option(False, help="replace existing output files; only pages, tables and figures that "
                                               "meraser report wrote are ever replaced"),
):
    """One HTML page for finished runs (Table 1, FSR per erase/recover epoch, per-trigger outputs), or for
    `meraser bench` folders (every cell's status, the attack table, which fingerprint survives which attack and the
    leaderboards as well)."""
    from meraser.report import make_report, terminal_tables

    console = _console(200)
    rep = make_report(runs, out, title=title, show_secrets=show_secrets, markdown=markdown, figures=figures,
                      overwrite=overwrite)
    for table in terminal_tables(rep.runs, rep.cells):
        console.print(table)
    if rep.timing:
        console.print(rep.timing)
    if rep.markdown:
        console.print(f"[green]tables[/] written to {rep.markdown}")
    if rep.figures:
        console.print(f"[green]figures[/] written to {figures}: {', '.join(p.name for p in rep.figures)}")
    console.print(f"[green]report[/] written to {rep.page}")


transfer_app = typer.Typer(help="Transferable erasure: train the erase adapter once on a clean base, apply it anywhere.")
app.add_typer(transfer_app, name="transfer")


@transfer_app.command("train")
def transfer_train(
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="clean base model the fingerprinted models derive from"),
    data: str = typer.Option(_data_default("MismatchedSet", "source"), help="instruction source for the mismatched "
                             "set (or a ready mismatched file with --ready-made)"),
    out: Path = typer.Option(..., "--out", "-o", help="adapter output folder"),
    n: int = typer.Option(_data_default("MismatchedSet", "n"), min=2, help="mismatched rows"),
    ready_made: bool = typer.Option(False, help="use --data as the finished mismatched set"),
    preset_name: PresetName = _preset_default(),
    set_: PhaseSets = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Train the MEraser erase adapter on a clean base model (section 4.3)."""
    from meraser.erase.datasets import MismatchedSet
    from meraser.erase.transfer import transfer_train as run

    _quiet_libraries()
    sets = MismatchedSet.from_dict({"source": data, "n": n, "ready_made": ready_made}, where="transfer train")
    res = run(base, out, data=sets, preset_name=preset_name, overrides=_parse_sets(set_), overwrite=overwrite,
              resume=resume)
    _console().print(f"[green]erase adapter[/] saved to {res.output_dir} ({res.metrics['seconds']} s)")


@transfer_app.command("apply")
def transfer_apply(
    adapter: Path = typer.Option(..., help="erase adapter from `meraser transfer train`"),
    model: str = typer.Option(..., "--model", "-m", help="fingerprinted model (same architecture as the adapter's base)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the merged model"),
    overwrite: Overwrite = False,
):
    """Merge a transferable erase adapter into a fingerprinted model: no training per victim."""
    from meraser.erase.transfer import transfer_apply as run
    from meraser.fingerprints.embed import model_dir

    _quiet_libraries()
    _console().print(f"[green]erased model[/] saved to {run(adapter, model_dir(model), out, overwrite=overwrite)}")


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


if __name__ == "__main__":
    main()
