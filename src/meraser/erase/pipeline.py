"""`meraser run EXPERIMENT.yaml` and `meraser demo`: fingerprint -> erase -> recover, evaluated at every stage.

Every stage writes its own folder under `out` (atomically, so a folder that exists is complete) and appends its
evaluation to `out/results.jsonl`; a re-run skips finished stages and evaluations. Erase and recover never read
the card; only the evaluation and the per-epoch FSR probe (monitoring) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meraser.config import Config, field, load_yaml
from meraser.evaluation.evaluate import EvalConfig
from meraser.utils import MeraserError, append_jsonl, read_json, read_jsonl, write_json


@dataclass
class FingerprintStage(Config):
    method: str = field("utf", help="fingerprint method to embed (ignored when `existing` is set)")
    config: dict = field({}, help="method config overrides (see meraser.fingerprints.<method>)")
    existing: str | None = field(None, help="folder of an existing fingerprinted model (model/ + card) to attack")
    card: str | None = field(None, help="card path when `existing` is a plain model folder")


@dataclass
class DataStage(Config):
    source: str = field("chitchat", help="instruction source: file, 'chitchat' or hf:ID")
    n: int = field(300, help="rows to build")
    ready_made: bool = field(False, help="use `source` as the finished set (e.g. the paper's reference files)")
    by_type: bool = field(True, help="mismatched: take responses from another question type")
    self_answers: bool = field(False, help="clean: use the model's own answers (data-free recovery)")
    seed: int = field(0, help="seed")


@dataclass
class PhaseStage(Config):
    preset: str = field("paper", help="'paper' (r=16, q/v), 'all-linear' (LoRA on every linear layer) or "
                                       "'reference' (the public code's settings)")
    overrides: dict = field({}, help="TrainConfig fields over the preset")


@dataclass
class Experiment(Config):
    model: str = field("smollm2-135m", help="base model spec")
    out: str = field("runs/experiment", help="output folder")
    fingerprint: FingerprintStage = field(None, help="how the fingerprinted model is made or found")
    mismatched: DataStage = field(None, help="mismatched set D_m")
    clean: DataStage = field(None, help="clean set D_c")
    erase: PhaseStage = field(None, help="erase phase")
    recover: PhaseStage = field(None, help="recover phase")
    eval: EvalConfig = field(None, help="evaluation at every stage")
    probe_fsr: bool = field(True, help="record FSR after every erase/recover epoch (monitoring only)")
    eval_base: bool = field(True, help="also evaluate the base model (`model`) with the card, for comparison")

    def __post_init__(self):
        self.fingerprint = self.fingerprint or FingerprintStage()
        self.mismatched = self.mismatched or DataStage()
        self.clean = self.clean or DataStage(n=600)
        self.erase = self.erase or PhaseStage()
        self.recover = self.recover or PhaseStage()
        self.eval = self.eval or EvalConfig()


def _build_data(exp: Experiment, out: Path, model, tok) -> tuple[list, list]:
    from meraser.data import load_pairs, write_pairs
    from meraser.erase.datasets import build_clean, build_mismatched, self_answers

    d = out / "data"
    if (d / "mismatched.jsonl").exists() and (d / "clean.jsonl").exists():
        return load_pairs(str(d / "mismatched.jsonl")), load_pairs(str(d / "clean.jsonl"))
    m, c = exp.mismatched, exp.clean
    if m.ready_made:
        mism, meta = load_pairs(m.source)[: m.n], None
    else:
        mism, meta = build_mismatched(load_pairs(m.source), m.n, m.seed, m.by_type)
    if c.ready_made:
        clean = load_pairs(c.source)[: c.n]
    else:
        clean = build_clean(load_pairs(c.source), c.n, c.seed, {p.prompt for p in mism})
    if c.self_answers:
        clean = self_answers(model, tok, [p.prompt for p in clean])
    write_pairs(mism, d / "mismatched.jsonl", meta)
    write_pairs(clean, d / "clean.jsonl")
    return mism, clean


def _logged_probes(phase_dir: Path) -> list[dict]:
    log = phase_dir / "train_log.json"
    return read_json(log, "training log").get("metrics", {}).get("probes", []) if log.exists() else []


def run_experiment(exp: Experiment, *, progress: bool = True, console=None) -> list[dict]:
    """Run (or resume) an experiment; returns one result row per stage: fingerprinted, erased, recovered."""
    from meraser.erase.meraser import algorithm1_verify, erase, ordinary_accuracy, preset, recover
    from meraser.evaluation.evaluate import evaluate_model
    from meraser.evaluation.fsr import fsr
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import CARD_FILE, embed, model_dir
    from meraser.models import load_model

    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", exp.to_dict())
    say = console.print if console else (lambda *a, **k: None)
    done = {r["stage"]: r for r in read_jsonl(out / "results.jsonl")}

    # stage 1: the fingerprinted model and its card
    fp = exp.fingerprint
    if fp.existing:
        fp_dir, card_path = model_dir(fp.existing), fp.card or str(Path(fp.existing) / CARD_FILE)
        model, tok = load_model(fp_dir)
    elif (out / "fingerprinted" / CARD_FILE).exists():
        fp_dir, card_path = str(out / "fingerprinted" / "model"), str(out / "fingerprinted" / CARD_FILE)
        say(f"[dim]fingerprinted: reusing {fp_dir}[/]")
        model, tok = load_model(fp_dir)
    else:
        from meraser.fingerprints import get_method

        say(f"[bold]1/3 fingerprint[/] {exp.model} with {fp.method}")
        method = get_method(fp.method)
        base, tok = load_model(exp.model)
        model, _, _ = embed(fp.method, base, tok, method.Config.from_dict(fp.config), out / "fingerprinted",
                            progress=progress)
        fp_dir, card_path = str(out / "fingerprinted" / "model"), str(out / "fingerprinted" / CARD_FILE)
        model._meraser_spec = fp_dir
    card = Card.load(card_path)

    def evaluate_stage(stage: str, m, extra: dict | None = None) -> dict:
        if stage in done:
            return done[stage]
        row = {"stage": stage, **evaluate_model(m, tok, exp.eval, card, progress=progress), **(extra or {})}
        append_jsonl(out / "results.jsonl", row)
        done[stage] = row
        say(f"  {stage}: FSR {row['fsr']:.1%}" + (f", PPL {row['ppl']['ppl']:.2f}" if "ppl" in row else ""))
        return row

    # the unfingerprinted model: FSR ~0 and the PPL to compare with (an existing fingerprint's card names its base)
    base_spec = card.base_model if fp.existing else exp.model
    if exp.eval_base and base_spec and "base" not in done:
        base_model, _ = load_model(base_spec)
        evaluate_stage("base", base_model)
        del base_model
    reference_acc = done.get("fingerprinted", {}).get("ordinary_accuracy")
    if reference_acc is None:
        reference_acc = ordinary_accuracy(model, tok)
    made = Path(card_path).parent / "fingerprint_summary.json"  # present when this tool made the fingerprint
    made = {"fingerprint_seconds": read_json(made, "fingerprint summary").get("seconds")} if made.exists() else {}
    evaluate_stage("fingerprinted", model, {"ordinary_accuracy": reference_acc, **made})
    mism, clean = _build_data(exp, out, model, tok)
    probe = (lambda m, epoch: {"fsr": fsr(m, tok, card, false_positive_inputs=0)["fsr"]}) if exp.probe_fsr else None

    # stage 2: erase (LoRA on D_m); the adapter is saved, the merged model carried forward in memory
    if (out / "erased" / "adapter_config.json").exists():
        erased, _ = load_model(str(out / "erased"), base=fp_dir)
        erase_probes = _logged_probes(out / "erased")
    else:
        say(f"[bold]2/3 erase[/] on {len(mism)} mismatched rows ({exp.erase.preset} preset)")
        res = erase(model, tok, mism, preset("erase", exp.erase.preset, exp.erase.overrides), out / "erased",
                    merge_out=False, resume=True, probe=probe, progress=progress)
        erased = res.model.merge_and_unload()
        erase_probes = res.probes
    erased._meraser_spec = str(out / "erased")
    evaluate_stage("erased", erased, {"fsr_per_epoch": erase_probes,
                                      **algorithm1_verify(erased, tok, card, reference_acc)})

    # stage 3: recover (LoRA on D_c over the merged erased model)
    if (out / "recovered" / "adapter_config.json").exists():
        recovered, _ = load_model(str(out / "recovered"), base=str(out / "erased"))
        rec_probes = _logged_probes(out / "recovered")
    else:
        say(f"[bold]3/3 recover[/] on {len(clean)} clean rows ({exp.recover.preset} preset)")
        res = recover(erased, tok, clean, preset("recover", exp.recover.preset, exp.recover.overrides),
                      out / "recovered", merge_out=False, resume=True, probe=probe, progress=progress)
        recovered = res.model.merge_and_unload()
        rec_probes = res.probes
    evaluate_stage("recovered", recovered, {"fsr_per_epoch": rec_probes,
                                            **algorithm1_verify(recovered, tok, card, reference_acc)})
    return [done[s] for s in ("base", "fingerprinted", "erased", "recovered") if s in done]


def load_experiment(path: str | Path) -> Experiment:
    return Experiment.from_dict(load_yaml(path), where=str(path))


def demo_experiment(out: str = "runs/demo") -> Experiment:
    """The README's main job on the embedded SmolLM2-135M, sized for ~15 minutes on 2 CPU cores."""
    return Experiment.from_dict({
        "model": "smollm2-135m", "out": out,
        "fingerprint": {"method": "utf"},
        "mismatched": {"source": "chitchat", "n": 300}, "clean": {"source": "chitchat", "n": 300},
        "erase": {"preset": "paper", "overrides": {"epochs": 4}},
        "recover": {"preset": "paper", "overrides": {"epochs": 1}},
        "eval": {"ppl": "responses:chitchat", "ppl_windows": 100, "false_positive_inputs": 16},
    })


def check_resumable(exp: Experiment) -> None:
    if exp.fingerprint.existing and not Path(exp.fingerprint.existing).exists():
        raise MeraserError(f"fingerprint.existing: {exp.fingerprint.existing} does not exist")
