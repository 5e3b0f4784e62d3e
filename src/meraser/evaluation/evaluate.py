"""`meraser evaluate`: FSR (given a card), perplexity and zero-shot accuracy of one model, as one dict/table.

The erasure pipeline calls `evaluate_model` at every stage, so the numbers in its tables come from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from meraser.config import Config, field
from meraser.evaluation.ownership import p_text


@dataclass
class EvalConfig(Config):
    ppl: str | None = field(None, help="text source for perplexity (.txt/.json/.jsonl or hf:NAME); None: skip")
    text_field: str | None = field(None, help="dotted field path of the text in a JSON source")
    ppl_windows: int = field(200, help="at most this many windows")
    ppl_window: int = field(512, help="window length in tokens")
    tasks: list[str] = field([], help="lm-eval task names and/or BIG-bench task.json paths")
    limit: int | None = field(None, help="examples per task (None: all)")
    batch_size: int = field(8, help="batch size for perplexity and lm-eval")
    false_positive_inputs: int = field(32, help="non-trigger inputs checked for false positives (0: skip)")
    strict: bool = field(True, help="with a card, the strict checks too: forced target prefix, sampling, target "
                                    "log-likelihood, partial match (evaluation/strict.py)")

    def validate(self, where: str) -> None:
        from meraser.config import key_path
        from meraser.utils import MeraserError

        for name, low in (("ppl_windows", 1), ("ppl_window", 2), ("batch_size", 1), ("false_positive_inputs", 0)):
            if getattr(self, name) < low:
                raise MeraserError(f"{key_path(where, name)} must be at least {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise MeraserError(f"{key_path(where, 'limit')} must be at least 1 (or null for all), got {self.limit}")

    def check_inputs(self, where: str) -> None:
        """Local files named here exist (checked before any work; hub names are checked when used)."""
        from pathlib import Path

        from meraser.config import key_path
        from meraser.utils import MeraserError

        if self.ppl and not self.ppl.startswith(("hf:", "responses:")) and not Path(self.ppl).is_file():
            raise MeraserError(f"{key_path(where, 'ppl')}: text source {self.ppl} is not a file "
                               f"(a .txt/.json/.jsonl file, responses:SOURCE or hf:NAME)")
        for t in self.tasks:
            if t.endswith(".json") and not Path(t).is_file():
                raise MeraserError(f"{key_path(where, 'tasks')}: task file {t} does not exist")
            if Path(t).is_dir():  # a BIG-bench folder without a task file is refused here, before any model loads
                from meraser.evaluation.zeroshot import task_file

                task_file(Path(t))


def evaluate_model(model, tokenizer, cfg: EvalConfig, card=None, progress: bool = False, decoding=None,
                   strict_base: dict | None = None) -> dict:
    """Evaluate an in-memory model; keys: fsr/false_positive_rate and strict (with a card; strict is compared with
    `strict_base`, the base model's strict result, when given), ppl, tasks, mean_acc, seconds.

    Under a decoding attack (`decoding`, see attacks/decoding.py) FSR and false positives are generated through it;
    perplexity and log-likelihood tasks score the model's own distribution, which the attack does not change, so
    they are reported as not applicable rather than as the plain model's numbers (the paper writes "-")."""
    out: dict = {}
    t0 = time.perf_counter()
    if card is not None:
        from meraser.evaluation.fsr import fsr

        out.update(fsr(model, tokenizer, card, false_positive_inputs=cfg.false_positive_inputs, decoding=decoding))
        if cfg.strict and decoding is None and card.has_target_text:  # they decode their own way (forced, sampled)
            from meraser.evaluation.strict import strict_check

            out["strict"] = strict_check(model, tokenizer, card, base_result=strict_base)
        from meraser.evaluation.verifications import measured

        out.update(measured(model, tokenizer, card, progress, decoding))  # every other registered verification
    if decoding is not None and decoding.name != "greedy":
        from meraser.evaluation.verifications import NOT_APPLICABLE

        out["decoding"] = decoding.name
        out.update({k: NOT_APPLICABLE for k, on in (("ppl", cfg.ppl), ("tasks", cfg.tasks)) if on})
    elif cfg.ppl:
        from meraser.evaluation.perplexity import corpus_perplexity

        out["ppl"] = corpus_perplexity(model, tokenizer, cfg.ppl, text_field=cfg.text_field, window=cfg.ppl_window,
                                       max_windows=cfg.ppl_windows, batch_size=cfg.batch_size, progress=progress)
    if cfg.tasks and "tasks" not in out:
        from meraser.evaluation.zeroshot import zero_shot

        out["tasks"] = zero_shot(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.batch_size)
        accs = [r["acc"] for r in out["tasks"].values() if r["acc"] is not None]
        out["mean_acc"] = sum(accs) / len(accs) if accs else None
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def evaluate(model: str, cfg: EvalConfig, card: str | None = None, trust_remote_code: bool = False,
             progress: bool = True) -> dict:
    """Load `model` (any spec) and evaluate it; `card` is a fingerprint card path."""
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    c = Card.load(card) if card else None
    cfg.check_inputs("--tasks/--ppl")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    return {"model": model, **evaluate_model(m, tok, cfg, c, progress=progress)}


def results_table(rows: list[dict], title: str = "evaluation"):
    """A rich table with one column per model/stage and one row per metric: FSR, false positives, PPL, each task's
    accuracy ± stderr, and the mean accuracy (metrics down the side so a dozen tasks still fit a terminal)."""
    from rich.table import Table

    tasks = list(dict.fromkeys(t for r in rows if isinstance(r.get("tasks"), dict) for t in r["tasks"]))
    table = Table(title=title)
    table.add_column("metric")
    for r in rows:
        table.add_column(str(r.get("stage") or r.get("model")), justify="right")

    def add(label, cell):
        cells = [cell(r) for r in rows]
        if any(cells):
            table.add_row(label, *cells)

    add("FSR", lambda r: f"{r['fsr']:.1%}" if "fsr" in r else "")
    add("false positives", lambda r: f"{r['false_positive_rate']:.1%}" if "false_positive_rate" in r else "")
    add("strict: forced prefix", lambda r: f"{r['strict']['forced']:.0%}" if "strict" in r else "")
    add("strict: paraphrased", lambda r: f"{r['strict']['paraphrased']:.0%}" if "strict" in r else "")
    add("strict: sampled", lambda r: f"{r['strict']['sampled']:.0%}" if "strict" in r else "")
    add("strict: partial", lambda r: f"{r['strict']['partial']:.0%}" if "strict" in r else "")
    add("strict: target loglik", lambda r: f"{r['strict']['loglik']:.2f}" if "strict" in r else "")
    add("erased strictly", lambda r: str(r["strict"]["erased_strict"]) if "erased_strict" in r.get("strict", {})
        else "")
    add("ownership p-value", lambda r: p_text(r['ownership']['p_value']) if "ownership" in r else "")
    from meraser.evaluation.verifications import REGISTRY, verdict_text

    for v in REGISTRY.values():
        add(f"verified by {v.title}", lambda r, v=v: verdict_text(v, r))
    add("PPL", ppl_text)
    for t in tasks:
        def cell(r, t=t):
            a = r["tasks"].get(t) if isinstance(r.get("tasks"), dict) else None
            return f"{a['acc']:.3f} ± {a['acc_stderr']:.3f}" if a and a["acc"] is not None else ""
        add(t.removeprefix("bb_"), cell)
    add("mean acc", lambda r: f"{r['mean_acc']:.3f}" if r.get("mean_acc") is not None else "")
    return table


def ppl_text(row: dict) -> str:
    """A row's perplexity as printed: two decimals, "n/a" under a decoding attack, "" when not measured."""
    if "ppl" not in row:
        return ""
    return "n/a" if isinstance(row["ppl"], str) else f"{row['ppl']['ppl']:.2f}"
