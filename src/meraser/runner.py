"""`meraser run EXPERIMENT.yaml` and `meraser demo`: fingerprint -> erase -> recover, evaluated at every stage.

Three rules make a run folder trustworthy:
- **Checked before any work.** `plan_experiment` resolves every stage's settings (fingerprint method and config,
  presets with their overrides typed against TrainConfig, set sizes and sources, LoRA target modules against the
  model's own modules, evaluation inputs) and raises naming the file and key at fault; nothing is written before.
- **No stale stage.** Every stage has an identity: a hash of its settings and those of the stages it depends on,
  recorded in `out/stages.json` before the stage writes anything. A re-run reuses a stage only when its identity
  matches; otherwise it stops and names the settings that changed, and `overwrite=True` redoes that stage and the
  ones after it (and only those).
- **Atomic outputs.** Each stage writes its own folder or file in one rename and appends its evaluation to
  `out/results.jsonl`; a kill leaves either a finished stage or none (a torn last results line is dropped).

Erase and recover never read the card; only the evaluation and the per-epoch FSR probe (monitoring) do. Without a
card (`fingerprint.existing` with none), erase and recover still run and everything but FSR is evaluated.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from meraser.config import Config, field, key_path, load_yaml
from meraser.erase.datasets import CleanSet, MismatchedSet
from meraser.erase.meraser import Phase
from meraser.evaluation.evaluate import EvalConfig
from meraser.utils import (LOCK_FILE, MeraserError, append_jsonl, atomic_dir, changes, exclusive, flat_keys,
                           read_json, read_jsonl, settings_hash, unknown_name, write_json, write_jsonl)

RESULTS = "results.jsonl"
STAGE_RECORD = "stages.json"
NO_CARD = ("no fingerprint card: FSR is not measured (it needs the owner's card); perplexity, accuracy and the "
           "ordinary questions are")


@dataclass
class FingerprintStage(Config):
    method: str = field("utf", help="fingerprint method to embed (ignored when `existing` is set)")
    config: dict = field({}, help="method config overrides (see meraser.fingerprints.<method>)")
    existing: str | None = field(None, help="an existing fingerprinted or suspect model to attack: a `meraser "
                                            "fingerprint` folder, a model folder or a hub id")
    card: str | None = field(None, help="card of `existing` (default: its fingerprint_card.json if there is one; "
                                        "without a card, FSR is not measured)")

    def validate(self, where: str) -> None:
        from meraser.fingerprints import REGISTRY

        if self.card and not self.existing:
            raise MeraserError(f"{key_path(where, 'card')}: only with `existing` (a fingerprint made here writes "
                               f"its own card)")
        if not self.existing and self.method not in REGISTRY:
            raise unknown_name("fingerprint method", self.method, REGISTRY, key_path(where, "method"))


@dataclass
class AttackStage(Config):
    method: str = field("meraser", help="a registered attack (meraser attack --help lists them)")
    config: dict = field({}, help="the attack's settings (its config fields)")
    base: str | None = field(None, help="the base the fingerprinted model derives from (merging, transfer; default: "
                                        "the experiment's model or the card's base)")

    def validate(self, where: str) -> None:
        from meraser.attacks import REGISTRY

        if self.method not in REGISTRY:
            raise unknown_name("attack", self.method, REGISTRY, key_path(where, "method"))
        REGISTRY[self.method].Config.from_dict(self.config, where=key_path(where, "config"))


@dataclass
class Experiment(Config):
    model: str | None = field(None, help="base model: what `fingerprint.method` fingerprints (default: the embedded "
                                         "smollm2-135m) and the 'base' row (default with `existing`: the card's base)")
    out: str = field("runs/experiment", help="output folder")
    fingerprint: FingerprintStage = field(None, help="how the fingerprinted model is made or found")
    mismatched: MismatchedSet = field(None, help="mismatched set D_m")
    clean: CleanSet = field(None, help="clean set D_c")
    erase: Phase = field(None, help="erase phase")
    recover: Phase = field(None, help="recover phase")
    eval: EvalConfig = field(None, help="evaluation at every stage")
    probe_fsr: bool = field(True, help="record FSR after every erase/recover epoch (monitoring only; needs a card)")
    eval_base: bool = field(True, help="also evaluate the base model, for comparison")
    attack: AttackStage | None = field(None, help="run this attack on the fingerprinted model instead of the "
                                                  "erase and recover stages (same evaluation and results)")

    def __post_init__(self):
        self.fingerprint = self.fingerprint or FingerprintStage()
        self.mismatched = self.mismatched or MismatchedSet()
        self.clean = self.clean or CleanSet()
        self.erase = self.erase or Phase()
        self.recover = self.recover or Phase()
        self.eval = self.eval or EvalConfig()


@dataclass
class Stage:
    name: str
    settings: dict  # flat {key: value} of this stage and of every stage it depends on (for "what changed")
    id: str
    outputs: list[Path]  # what it writes, the first being the sign that it finished; none for evaluations

    def made_by(self, record: dict | None) -> bool:
        """Whether a stage record (its id and settings) is this stage. A setting the record lacks is a field added
        to meraser since, at its default; a new field's default keeps the old behaviour (the rule for adding one),
        so a finished run stays finished when meraser gains an option, instead of being redone for nothing."""
        if not record:
            return False
        if record.get("id") == self.id:
            return True
        old = record.get("settings")
        return old is not None and settings_hash({k: v for k, v in self.settings.items() if k in old}) == \
            record.get("id") and old.keys() <= self.settings.keys()


@dataclass
class Plan:
    """A validated experiment: every setting resolved, every stage's identity known. Making one writes nothing."""

    exp: Experiment
    out: Path
    fp_model: str  # the fingerprinted model: `existing`, or where the fingerprint stage writes it
    card_path: str | None
    card: object | None  # the Card when one exists before the run
    base: str | None  # the model evaluated as 'base' (None: skipped)
    fp_config: object | None  # the method config when fingerprinting here
    erase_cfg: object | None  # erase/recover TrainConfigs (None when an attack replaces them)
    recover_cfg: object | None
    attack_cfg: object | None
    stages: dict[str, Stage]


def _stages(exp: Experiment, out: Path, own: dict[str, dict], deps: dict[str, list[str]]) -> dict[str, Stage]:
    """Stages in run order; a stage's identity covers its own settings and those of everything it depends on."""
    outputs = {
        "fingerprinted": [] if exp.fingerprint.existing else [out / "fingerprinted"],
        "mismatched": [out / "data" / "mismatched.jsonl"], "clean": [out / "data" / "clean.jsonl"],
        "erased": [out / "erased", out / ".erased.work"], "recovered": [out / "recovered", out / ".recovered.work"],
        "attacked": [out / "attacked", out / ".attacked.attack"],
    }
    stages: dict[str, Stage] = {}
    for name, settings in own.items():
        full = dict(settings)
        for d in deps.get(name, []):
            full.update(stages[d].settings)
        stages[name] = Stage(name, full, settings_hash(full), outputs.get(name, []))
    return stages


def _check_lora_targets(spec: str | None, cfgs: list, where: str) -> None:
    from meraser.models import meta_model
    from meraser.training import check_target_modules

    model = meta_model(spec) if spec else None
    if model is None:  # a hub id offline: checked when the model loads
        return
    for kind, cfg in zip(("erase", "recover"), cfgs):
        try:
            check_target_modules(model, cfg.lora.target_modules)
        except MeraserError as e:
            raise MeraserError(f"{where}{kind}.overrides.lora.target_modules: {e}") from None


def existing_card(existing: str, card: str | None) -> str | None:
    """The card of an existing fingerprinted model: the one given, else its folder's fingerprint_card.json, else none
    (FSR is then not measured)."""
    from meraser.fingerprints.embed import CARD_FILE

    return card or (str(Path(existing) / CARD_FILE) if (Path(existing) / CARD_FILE).is_file() else None)


def plan_experiment(exp: Experiment, where: str = "experiment: ") -> Plan:
    """Check the whole experiment and resolve every stage before any work; raise naming the key at fault."""
    from meraser.fingerprints import get_method
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import CARD_FILE, model_dir
    from meraser.models import DEFAULT_MODEL, check_model_spec, input_folders
    from meraser.utils import check_apart

    out, fp = Path(exp.out), exp.fingerprint
    card = fp_cfg = None
    if fp.existing:
        fp_model = model_dir(fp.existing)
        check_model_spec(fp_model, f"{where}fingerprint.existing")
        card_path = existing_card(fp.existing, fp.card)
        card = Card.load(card_path) if card_path else None
        base = exp.model or (card.base_model if card else None)
        fp_settings = {"fingerprint.existing": str(Path(fp_model).resolve()) if Path(fp_model).exists() else fp_model,
                       "fingerprint.card": settings_hash(card.to_dict()) if card else None}
    else:
        base = exp.model or DEFAULT_MODEL
        fp_model, card_path = str(out / "fingerprinted" / "model"), str(out / "fingerprinted" / CARD_FILE)
        fp_cfg = get_method(fp.method).Config.from_dict(fp.config, where=f"{where}fingerprint.config")
        fp_settings = {"model": base, "fingerprint.method": fp.method, **flat_keys(fp_cfg.to_dict(), "fingerprint.config.")}
    if base:
        check_model_spec(base, f"{where}model")
    check_apart(out, input_folders(fp.existing, "fingerprint.existing model") + [("fingerprint.card", fp.card)]
                + input_folders(base, "model"))
    exp.eval.check_inputs(f"{where}eval")
    evaluation = {**flat_keys(exp.eval.to_dict(), "eval."), "card": fp_settings.get("fingerprint.card", "made here")}
    own = {"fingerprinted": fp_settings, "eval:base": {**evaluation, "base": base}, "eval:fingerprinted": evaluation}
    deps = {"eval:base": ["fingerprinted"], "eval:fingerprinted": ["fingerprinted"]}
    erase_cfg = recover_cfg = attack_cfg = None
    if exp.attack:
        attack_cfg = _plan_attack(exp, fp_model, base, where)
        own.update({"attacked": {"attack.method": exp.attack.method, **flat_keys(attack_cfg.to_dict(), "attack.config.")},
                    "eval:attacked": evaluation})
        deps.update({"attacked": ["fingerprinted"], "eval:attacked": ["attacked"]})
    else:
        exp.mismatched.check_inputs(f"{where}mismatched")
        exp.clean.check_inputs(f"{where}clean")
        erase_cfg = exp.erase.train_config("erase", f"{where}erase")
        recover_cfg = exp.recover.train_config("recover", f"{where}recover")
        _check_lora_targets(fp_model if fp.existing else base, [erase_cfg, recover_cfg], where)
        from meraser.evaluation.strict import probe_settings

        probes = {"probe_fsr": exp.probe_fsr, **(flat_keys(probe_settings(), "probe.") if exp.probe_fsr else {})}
        own.update({"mismatched": flat_keys(exp.mismatched.to_dict(), "mismatched."),
                    "clean": flat_keys(exp.clean.to_dict(), "clean."),
                    "erased": {**flat_keys(erase_cfg.to_dict(), "erase."), **probes},
                    "recovered": {**flat_keys(recover_cfg.to_dict(), "recover."), **probes},
                    "eval:erased": evaluation, "eval:recovered": evaluation})
        deps.update({"clean": ["mismatched"] + (["fingerprinted"] if exp.clean.needs_model else []),
                     "erased": ["fingerprinted", "mismatched"], "recovered": ["erased", "clean"],
                     "eval:erased": ["erased"], "eval:recovered": ["recovered"]})
    return Plan(exp, out, fp_model, card_path, card, base if exp.eval_base else None, fp_cfg, erase_cfg, recover_cfg,
                attack_cfg, _stages(exp, out, own, deps))


def _plan_attack(exp: Experiment, fp_model: str, base: str | None, where: str):
    """The attack's typed config, its inputs checked (with the base it will be given) before any work."""
    from meraser.attacks import get_attack
    from meraser.attacks.base import AttackContext

    attack = get_attack(exp.attack.method)
    cfg = attack.Config.from_dict(exp.attack.config, where=f"{where}attack.config")
    from meraser.attacks.base import recorded_base

    ctx = AttackContext(fp_model, exp.attack.base or base or recorded_base(fp_model), Path(exp.out) / ".attacked.attack")
    try:
        attack.check(cfg, ctx)
    except MeraserError as e:
        raise MeraserError(f"{where}attack: {e}") from None
    return cfg


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def reconcile(plan: Plan, overwrite: bool = False) -> tuple[list[str], dict, list[dict]]:
    """Compare what is in the run folder with the plan, before any work. A stage that was made with other settings
    is refused, naming what changed; with `overwrite` it and the stages after it are removed. Returns the names of
    the stages removed, and the stage records and result rows that remain (the run carries on from them). Refuses a
    non-empty folder that is not a meraser run (unless `overwrite`)."""
    out = plan.out  # a file in its place was refused before the lock (`run_experiment`)
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / STAGE_RECORD).exists() \
            and not (out / "experiment.json").exists():
        if not overwrite:
            raise MeraserError(f"output folder {out} is not empty and is not a meraser run; pass --overwrite to "
                               f"replace it")
        for entry in out.iterdir():
            if entry.name != LOCK_FILE:  # held by this run
                _remove(entry)
    for leftover in [*out.glob(".*.tmp-*"), *out.glob("data/.*.tmp-*")]:  # half-written by a killed run: never
        _remove(leftover)                                                  # a finished output, safe to drop
    records = read_json(out / STAGE_RECORD, "stage record") if (out / STAGE_RECORD).exists() else {}
    rows = read_jsonl(out / RESULTS, "results", torn_tail_ok=True)
    row_stages = {f"eval:{r.get('stage')}" for r in rows}  # an evaluation's output is its results row

    def present(s: Stage) -> bool:
        return s.name in row_stages or any(p.exists() for p in s.outputs)

    stale = [s for s in plan.stages.values() if present(s) and not s.made_by(records.get(s.name))]
    if stale and not overwrite:
        first = stale[0]
        raise MeraserError(
            f"{out}: stage '{first.name}' was made with other settings ({changes(records.get(first.name, {}).get('settings'), first.settings)}); "
            f"pass --overwrite to redo it and the stages after it ({', '.join(s.name for s in stale)})")
    for s in stale:
        for p in s.outputs:
            _remove(p)
        records.pop(s.name, None)
    gone = {s.name for s in stale}
    rows = [r for r in rows if f"eval:{r.get('stage')}" not in gone]
    if out.is_dir():
        write_jsonl(out / RESULTS, rows)  # also drops a torn last line
        write_json(out / STAGE_RECORD, records)
    return [s.name for s in stale], records, rows


class StageRows:
    """The evaluation rows of one run folder, one per stage: measured once and appended to results.jsonl, reused
    from there (or from the file a bench shares between the cells on one fingerprint), and completed with the
    verifications registered since a row was written. The run hands it the tokenizer and card once its
    fingerprinted stage has them (`bind`)."""

    def __init__(self, plan: Plan, rows: list[dict], begin, say, progress: bool, shared: Path | None,
                 fresh_since: float | None = None):
        self.plan, self.exp, self.out, self.shared = plan, plan.exp, plan.out, shared
        self.begin, self.say, self.progress = begin, say, progress
        self.fresh_since = fresh_since  # re-evaluating: a shared row written before this time is measured again
        self.by_stage = {r["stage"]: r for r in rows}
        self.tok = self.card = None

    def bind(self, tokenizer, card) -> None:
        self.tok, self.card = tokenizer, card

    def get(self, stage: str, default=None):
        return self.by_stage.get(stage, default)

    def of(self, stages: tuple[str, ...]) -> list[dict]:
        """The rows of `stages` that exist, in that order."""
        return [self.by_stage[s] for s in stages if s in self.by_stage]

    def evaluate(self, stage: str, model, extra=None, decoding=None) -> dict:
        """The evaluation row of a stage (FSR with a card, perplexity, accuracy), appended to results.jsonl once. A
        stored row (here, or shared by another bench cell) is reused; where it predates a verification registered
        since, that one alone is measured on `model` and a completed row supersedes it."""
        from meraser.evaluation.verifications import missing

        shared = self.shared_file(stage)
        own = self.by_stage.get(stage)
        common = self._fresh(shared)
        if own is None:
            self.begin(f"eval:{stage}")
        if own is None and common is None:
            row = self._measure(stage, model, extra, decoding)
        else:  # another cell may have completed the shared row already
            row = self._complete(own if own is not None and (common is None or not missing(own)) else common, model)
            if row is own:
                return row
        if shared is not None and row is not common:
            write_json(shared, row)
        append_jsonl(self.out / RESULTS, row)
        self.by_stage[stage] = row
        say_row(self.say, stage, row)
        return row

    def shared_row(self, stage: str) -> dict | None:
        """The row another cell of the bench measured for `stage` (base, fingerprinted), if any and fresh enough."""
        return self._fresh(self.shared_file(stage))

    def _fresh(self, shared: Path | None) -> dict | None:
        """The shared row at `shared`, unless there is none or (re-evaluating) it was written before this run."""
        if shared is None or not shared.is_file():
            return None
        if self.fresh_since is not None and shared.stat().st_mtime < self.fresh_since:
            return None
        return read_json(shared, "shared evaluation")

    def _complete(self, row: dict, model) -> dict:
        """`row` with the verifications it lacks measured on `model` (the stage's model, made again where it was not
        kept), each named in its "added_later"; `row` itself where none is missing or there is no model."""
        from meraser.evaluation.verifications import measured, missing

        todo = missing(row) if self.card is not None and model is not None else []
        if not todo:
            return row
        self.say(f"  {row['stage']}: measuring {', '.join(v.title for v in todo)} (registered after this row)")
        # a decoding attack's row: the weights' verifications do not apply (`measured` says so)
        added = measured(model, self.tok, self.card, self.progress, decoding=row.get("decoding"), only=todo)
        return {**row, **added, "added_later": sorted({*row.get("added_later", []), *added})}

    def _measure(self, stage: str, model, extra, decoding) -> dict:
        from meraser.evaluation.evaluate import evaluate_model

        strict_base = self.by_stage.get("base", {}).get("strict") if stage != "base" else None
        row = {"stage": stage, **evaluate_model(model, self.tok, self.exp.eval, self.card, progress=self.progress,
                                                decoding=decoding, strict_base=strict_base),
               **(extra() if extra else {})}
        null = self.by_stage.get("base", row).get("null_logprobs")
        if null is not None and "per_trigger" in row:  # the ownership decision against the base model's chance
            from meraser.evaluation.ownership import ownership

            row["ownership"] = ownership([p["match"] for p in row["per_trigger"]], null)
        return row

    def shared_file(self, stage: str) -> Path | None:
        """Where a bench keeps the base and fingerprinted rows that every cell on the same fingerprint shares. The
        key is both stages' identities: the fingerprinted row's strict verdict and p-value read the base row."""
        if self.shared is None or stage not in ("base", "fingerprinted"):
            return None
        ids = [self.plan.stages["eval:base"].id, self.plan.stages[f"eval:{stage}"].id, self.plan.base]
        return self.shared / "evals" / f"{stage}__{settings_hash(ids)[:16]}.json"


def say_row(say, stage: str, row: dict) -> None:
    """One line in the terminal: what a stage's row says, every verification included."""
    from meraser.evaluation.evaluate import ppl_text
    from meraser.evaluation.ownership import p_text
    from meraser.evaluation.verifications import REGISTRY, verdict_text

    strict = row.get("strict", {})
    say(f"  {stage}: " + ", ".join(
        ([f"FSR {row['fsr']:.1%}"] if "fsr" in row else []) +
        ([f"strict: forced {strict['forced']:.0%}, paraphrased {strict['paraphrased']:.0%}, sampled "
          f"{strict['sampled']:.0%}, partial {strict['partial']:.0%}, loglik {strict['loglik']:.2f}"]
         if strict else []) +
        ([f"erased strictly: {strict['erased_strict']}"] if "erased_strict" in strict else []) +
        ([f"ownership p-value {p_text(row['ownership']['p_value'])}"] if "ownership" in row else []) +
        [f"{v.title} {text}" for v in REGISTRY.values() if v.column for text in [verdict_text(v, row)] if text]
        + ([f"PPL {ppl_text(row)}"] if "ppl" in row else [])))


class ExperimentRun:
    """One function per stage; each reuses its output when the plan's identity matches, else records and makes it."""

    def __init__(self, plan: Plan, records: dict, rows: list[dict], progress: bool = True, console=None,
                 shared: Path | None = None, on_stage=None, fresh_since: float | None = None):
        self.plan, self.exp, self.out = plan, plan.exp, plan.out
        self.shared = shared
        self.progress = progress
        self.on_stage = on_stage or (lambda name: None)
        self.say = console.print if console else (lambda *a, **k: None)
        self.rows = StageRows(plan, rows, self._begin, self.say, progress, shared, fresh_since)
        self.records = records
        self.card = plan.card
        self.tok = None

    def _made(self, name: str) -> bool:
        st = self.plan.stages[name]
        return bool(st.outputs) and st.outputs[0].exists() and st.made_by(self.records.get(name))

    def _begin(self, name: str) -> None:
        """Record a stage's identity before it writes anything, so whatever it leaves is known to belong to it."""
        st = self.plan.stages[name]
        self.records[name] = {"id": st.id, "settings": st.settings}
        write_json(self.out / STAGE_RECORD, self.records)
        self.on_stage(name)

    def fingerprint(self):
        """Stage 1: the fingerprinted model (made here with its card, or an existing one)."""
        from meraser.fingerprints.card import Card
        from meraser.fingerprints.embed import embed
        from meraser.models import load_model

        fp = self.exp.fingerprint
        if fp.existing or self._made("fingerprinted"):
            if not fp.existing:
                self.say(f"[dim]fingerprinted: reusing {self.plan.fp_model}[/]")
            model, self.tok = load_model(self.plan.fp_model)
        else:
            self.say(f"[bold]1/3 fingerprint[/] {self.plan.stages['fingerprinted'].settings['model']} with {fp.method}")
            self._begin("fingerprinted")
            base, self.tok = load_model(self.plan.stages["fingerprinted"].settings["model"])
            model, _, _ = embed(fp.method, base, self.tok, self.plan.fp_config, self.out / "fingerprinted",
                                progress=self.progress)
            model._meraser_spec = self.plan.fp_model
        if self.card is None and self.plan.card_path and Path(self.plan.card_path).exists():
            self.card = Card.load(self.plan.card_path)
        if self.card is None:
            self.say(f"[yellow]{NO_CARD}[/]")
        self.rows.bind(self.tok, self.card)
        return model

    def base(self) -> None:
        """The unfingerprinted model: FSR ~0 and the perplexity to compare with."""
        from meraser.evaluation.algorithm1 import ordinary_accuracy
        from meraser.evaluation.verifications import missing
        from meraser.models import load_model

        if not self.plan.base:
            return
        stored = self.rows.get("base") or self.rows.shared_row("base")
        if stored is not None and not missing(stored):
            self.rows.evaluate("base", None)  # evaluated already (by this run, or by another cell of a bench)
        else:
            base_model, _ = load_model(self.plan.base)
            self.rows.evaluate("base", base_model, lambda: {"ordinary_accuracy": ordinary_accuracy(base_model, self.tok),
                                                       **self._null(base_model)})

    def _null(self, base_model) -> dict:
        """The base model's log-probability of each target: the chance an unmarked model matches a key."""
        if self.card is None or not self.card.has_target_text:
            return {}
        from meraser.evaluation.ownership import target_logprobs

        return {"null_logprobs": [round(x, 4) for x in target_logprobs(base_model, self.tok, self.card)]}

    def data(self, model) -> tuple[list, list]:
        """Stage 2a/2b: the mismatched and clean sets, each written once as JSONL."""
        from meraser.data import load_pairs, write_pairs

        d = self.out / "data"
        if self._made("mismatched"):
            mism = load_pairs(str(d / "mismatched.jsonl"))
        else:
            self._begin("mismatched")
            mism, meta = self.exp.mismatched.build()
            write_pairs(mism, d / "mismatched.jsonl", meta)
        if self._made("clean"):
            clean = load_pairs(str(d / "clean.jsonl"))
        else:
            self._begin("clean")
            clean = self.exp.clean.build({p.prompt for p in mism}, model, self.tok, mism)
            write_pairs(clean, d / "clean.jsonl")
        return mism, clean

    def _probe(self):
        if not (self.exp.probe_fsr and self.card is not None):
            return None
        from meraser.evaluation import strict
        from meraser.evaluation.fsr import fsr

        # the paper's FSR, and whether the fingerprint only hides: its target prefix forced, its log-likelihood
        return lambda m, epoch: {"fsr": fsr(m, self.tok, self.card, false_positive_inputs=0)["fsr"],
                                 **strict.probe(m, self.tok, self.card)}

    def _phase(self, name: str, kind: str, label: str, model, rows: list, base_spec: str):
        """Erase or recover: LoRA on `rows` over `model`; the adapter is saved, the merged model carried on."""
        from meraser.erase.meraser import erase, recover
        from meraser.models import load_model, record_base

        folder = self.out / name
        shared = self.shared / name / self.plan.stages[name].id if self.shared is not None else None
        if not self._made(name) and shared is not None and shared.is_dir():
            self._begin(name)  # another cell of the bench made this very stage: same model, data and settings
            with atomic_dir(folder, overwrite=True) as tmp:
                shutil.copytree(shared, tmp, dirs_exist_ok=True)
                # the copy applies to this cell's own model before it, not to the folder of the cell that made it
                record_base(tmp, base_spec, at=folder)
        if self._made(name):
            done, _ = load_model(str(folder), base=base_spec)
            probes = read_json(folder / "train_log.json", "training log").get("metrics", {}).get("probes", [])
        else:
            self.say(f"[bold]{label}[/] on {len(rows)} {'mismatched' if kind == 'erase' else 'clean'} rows "
                     f"({getattr(self.exp, kind).preset} preset)")
            self._begin(name)
            run = erase if kind == "erase" else recover
            cfg = self.plan.erase_cfg if kind == "erase" else self.plan.recover_cfg
            res = run(model, self.tok, rows, cfg, folder, merge_out=False, resume="auto", probe=self._probe(),
                      progress=self.progress)
            done, probes = res.model.merge_and_unload(), res.probes
            if shared is not None and not shared.exists():
                try:
                    with atomic_dir(shared) as tmp:
                        shutil.copytree(folder, tmp, dirs_exist_ok=True)
                except MeraserError:  # another cell (a Ray task) shared the same stage first
                    pass
        done._meraser_spec = str(folder)
        return done, probes

    def verdict(self, model, decoding=None) -> dict:
        """Algorithm 1 against the base model's ordinary accuracy (the stated absolute bar without a base)."""
        from meraser.evaluation.algorithm1 import algorithm1_verify

        base_accuracy = self.rows.get("base", {}).get("ordinary_accuracy")
        return algorithm1_verify(model, self.tok, self.card, base_accuracy, decoding=decoding)

    def attack(self, model):
        """The `attack:` stage: any registered attack in place of erase and recover, saved as a model folder (a
        decoding-time attack saves its record and the model stays as it is): (model, info, decoding or None)."""
        import shutil
        import time

        from meraser.attacks import get_attack
        from meraser.attacks.base import AttackContext, apply_attack, is_decoding, recorded_base
        from meraser.models import load_model, save_model

        folder, a = self.out / "attacked", self.exp.attack
        attack = get_attack(a.method)
        ctx = AttackContext(self.plan.fp_model, a.base or self.plan.stages["eval:base"].settings["base"]
                            or recorded_base(self.plan.fp_model), folder.parent / ".attacked.attack", self.progress)
        if is_decoding(attack):
            return self._decoding_attack(attack, model, ctx)
        if self._made("attacked"):
            return load_model(str(folder))[0], read_json(folder / "meraser_model.json", "model record"), None
        self.say(f"[bold]2/2 attack[/] {a.method}")
        self._begin("attacked")
        t0 = time.perf_counter()
        attacked = apply_attack(attack, model, self.tok, self.plan.attack_cfg, ctx)
        info = {"attack": a.method, "attack_seconds": round(time.perf_counter() - t0, 1), **ctx.info,
                **(attack.scored(ctx, self.card) if self.card is not None else {})}
        attacked._meraser_spec = self.plan.fp_model
        save_model(attacked, self.tok, folder, meta=info, extra_files=ctx.files)
        shutil.rmtree(ctx.work, ignore_errors=True)
        return attacked, info, None

    def _decoding_attack(self, attack, model, ctx):
        """A decoding-time attack's stage: prepared once (Token Forcing's scan), its record and extracted sequences
        kept in attacked/, and re-prepared from them when the run resumes."""
        import dataclasses
        import time

        from meraser.attacks.base import ATTACK_RECORD, write_attack_record

        folder, cfg = self.out / "attacked", self.plan.attack_cfg
        if self._made("attacked"):
            if (folder / "extracted.jsonl").is_file():
                cfg = dataclasses.replace(cfg, sequences=str(folder / "extracted.jsonl"))
            return model, read_json(folder / ATTACK_RECORD, "attack record"), attack.decoding(model, self.tok, cfg, ctx)
        self.say(f"[bold]2/2 attack[/] {attack.name} (decoding-time: the weights stay as they are)")
        self._begin("attacked")
        t0 = time.perf_counter()
        decoding = attack.decoding(model, self.tok, cfg, ctx)
        info = {"attack": attack.name, "attack_seconds": round(time.perf_counter() - t0, 1), **ctx.info}
        write_attack_record(folder, info, ctx.files, overwrite=False)
        return model, info, decoding

    def run(self) -> list[dict]:
        from meraser.evaluation.algorithm1 import ordinary_accuracy

        model = self.fingerprint()
        self.base()
        self.rows.evaluate("fingerprinted", model, lambda: {"ordinary_accuracy": ordinary_accuracy(model, self.tok),
                                                       **self._fingerprint_time()})
        if self.exp.attack:
            attacked, info, decoding = self.attack(model)
            self.rows.evaluate("attacked", attacked, lambda: {**info, **self.verdict(attacked, decoding)}, decoding)
            return self.rows.of(("base", "fingerprinted", "attacked"))
        mism, clean = self.data(model)
        erased, probes = self._phase("erased", "erase", "2/3 erase", model, mism, self.plan.fp_model)
        self.rows.evaluate("erased", erased, lambda: {"fsr_per_epoch": probes, **self.verdict(erased)})
        recovered, probes = self._phase("recovered", "recover", "3/3 recover", erased, clean, str(self.out / "erased"))
        self.rows.evaluate("recovered", recovered, lambda: {"fsr_per_epoch": probes, **self.verdict(recovered)})
        return self.rows.of(("base", "fingerprinted", "erased", "recovered"))

    def _fingerprint_time(self) -> dict:
        made = Path(self.plan.card_path or "").parent / "fingerprint_summary.json"  # when this tool made it
        return {"fingerprint_seconds": read_json(made, "fingerprint summary").get("seconds")} if made.is_file() else {}


def run_experiment(exp: Experiment, *, where: str = "experiment: ", overwrite: bool = False, progress: bool = True,
                   console=None, shared: Path | None = None, on_stage=None,
                   reevaluate_since: float | None = None) -> list[dict]:
    """Check, reconcile with what the run folder holds, then run (or resume) every stage; one result row per
    evaluated stage: base, fingerprinted, erased, recovered. With `shared` (a bench's folder), the base and
    fingerprinted rows and the erase and recover adapters are taken from there when another experiment made them
    with the same identity, and left there when this one makes them. `on_stage(name)` is called as each stage that
    has to be made (or evaluated: "eval:<stage>") begins: a bench names it beside the cell it runs.
    `reevaluate_since` (a time.time()): every stage is evaluated again on its stored model (after a fix to the
    evaluation), the trained models kept; so is a row shared by the bench's cells, unless written since that time
    (by another cell of the same re-evaluation)."""
    plan = plan_experiment(exp, where)
    if plan.out.exists() and not plan.out.is_dir():
        raise MeraserError(f"output {plan.out} is a file, not a folder")
    with exclusive(plan.out, "run folder"):  # a second run on this folder is refused, naming the first one's pid
        removed, records, rows = reconcile(plan, overwrite)
        if removed and console:
            console.print(f"[yellow]--overwrite: redoing {', '.join(removed)}[/]")
        write_json(plan.out / "experiment.json", exp.to_dict())
        if reevaluate_since is not None:
            rows = []
            write_jsonl(plan.out / RESULTS, rows)
        return ExperimentRun(plan, records, rows, progress, console, shared, on_stage, reevaluate_since).run()


def load_experiment(path: str | Path) -> Experiment:
    return Experiment.from_dict(load_yaml(path), where=f"{path}: ")


# the demo's wall time as measured (README, "Measured: `meraser demo`"); machines here differ about 2x in speed
DEMO_MEASURED = ("10 to 21 minutes on 2 CPU cores, with identical figures (README: 10:23, 19:38 and 21:26 on three "
                 "machines)")


def demo_experiment(out: str = "runs/demo") -> Experiment:
    """The README's main job on the embedded SmolLM2-135M, sized for ~15 minutes on 2 CPU cores (as measured:
    `DEMO_MEASURED`). The recovery is the paper's size (600 rows, 2 epochs; half of them Magpie's, the default): at
    300 rows and one epoch short answers did not come back (1% of the ordinary questions with half Magpie, 0% all
    Magpie; README), so Algorithm 1 said "not erased". The erase is shortened instead: UTF's FSR is 0 from the first erase epoch."""
    return Experiment.from_dict({
        "out": out,
        "fingerprint": {"method": "utf"},
        "erase": {"overrides": {"epochs": 3}},
        "eval": {"ppl": "responses:chitchat", "ppl_windows": 100, "false_positive_inputs": 16},
    }, where="demo: ")
