"""What a report reads: run folders (`meraser run` / `demo`) and bench folders (`meraser bench`), and what every
table and figure derives from a run (its final stage, its label, the attacked model's utility)."""

from __future__ import annotations

from pathlib import Path

from meraser.utils import MeraserError, read_json, read_jsonl

STAGES = ("base", "fingerprinted", "erased", "recovered", "attacked")  # attacked: an `attack:` stage instead
WIN_UTILITY = 0.9  # an attack "wins" a cell where the verification no longer shows ownership at this much of the
                   # fingerprinted model's utility (the leaderboard's shaded region, the strongest-attack rule)


def load_run(path: str | Path) -> dict:
    """{name, method, stages: {stage: row}} of a run folder; refuses a folder without results."""
    p = Path(path)
    # one rule for run and bench folders: a torn last line (a write cut off by a kill) is dropped with a warning
    rows = read_jsonl(p / "results.jsonl", "results store", torn_tail_ok=True)
    if not rows:
        raise MeraserError(f"{p}: no results.jsonl (is it a `meraser run` output folder?)")
    exp = read_json(p / "experiment.json", "experiment record") if (p / "experiment.json").exists() else {}
    fp = exp.get("fingerprint") or {}
    return {"name": p.name, "method": fp.get("existing") or fp.get("method", "?"), "model": exp.get("model", "?"),
            "stages": {r["stage"]: r for r in rows}}


def final_stage(run: dict) -> str:
    """A run's final stage: recovered (erase and recover) or attacked; "" before either."""
    return next((s for s in ("recovered", "attacked") if s in run["stages"]), "")


def last_row(run: dict) -> dict:
    """The row of a run's final stage."""
    return run["stages"].get(final_stage(run), {})


def run_label(run: dict, fingerprint: bool = True) -> str:
    """fingerprint, attack and the cell's own settings (dotted keys shortened to their last part), for figures."""
    import re

    settings = re.sub(r"\b[\w.]+\.(\w+)=", r"\1=", run.get("settings", ""))
    label = " ".join(x for x in (run["method"] if fingerprint else "", run.get("attack", ""), settings) if x)
    return label if len(label) <= 48 else label[:47] + "…"


def task_accs(row: dict) -> dict[str, float]:
    """{task: accuracy} of one stage's row (tasks without an accuracy left out)."""
    tasks = row.get("tasks") if isinstance(row.get("tasks"), dict) else {}
    return {t.removeprefix("bb_"): a["acc"] for t, a in tasks.items() if isinstance(a, dict) and a.get("acc") is not None}


# ---- a bench folder (`meraser bench`): one run per cell, plus the cells that are missing or failed ----

def is_bench(path: str | Path) -> bool:
    return (Path(path) / "matrix.json").is_file()


def load_bench(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(runs, cells): a run per finished cell (as `load_run` gives), and every cell of the matrix with its status:
    done, stale (done under settings that today's defaults change: its figures are shown, flagged, with what
    changed), failed (with the error) or missing. A partial store is fine."""
    from meraser.bench import FAILED, RESULTS, Matrix, describe, plan_cells, shared_root, stale_cells

    p = Path(path)
    by_cell: dict[str, dict] = {}
    for r in read_jsonl(p / RESULTS, "results store", torn_tail_ok=True):
        run = by_cell.setdefault(r["cell"], {"name": r["cell"], "method": r["fingerprint"], "attack": r["attack"],
                                             "model": r["model"], "grid": r.get("grid", {}), "stages": {},
                                             "seconds": r.get("cell_seconds"), "peak_rss_mb": r.get("peak_rss_mb")})
        run["stages"][r["stage"]] = r
    errors = {f["cell"]: f["error"] for f in read_jsonl(p / FAILED, "failure log", torn_tail_ok=True)}
    try:
        matrix = Matrix.from_dict(read_json(p / "matrix.json", "matrix record"))
        planned = plan_cells(matrix)
        stale = stale_cells(planned, set(by_cell), p.resolve(), shared_root(matrix))
    except MeraserError:  # the matrix names something this installation no longer has: show what was stored
        planned, stale = [], {}
    # a matrix over several models names each fingerprint with its model: the same key planted in two families
    # is two fingerprints, which every table (Table 1, survival, strongest attack) must keep apart
    several = len({c.model for c in planned}) > 1
    cells = [{"id": c.id, "fingerprint": f"{c.model} {fingerprint_name(c.fingerprint)}" if several
              else fingerprint_name(c.fingerprint),
              "attack": c.attack["method"], "grid": c.grid, "settings": describe(c),
              "status": "stale" if c.id in stale else "done" if c.id in by_cell else
              "failed" if c.id in errors else "missing",
              "error": stale.get(c.id) or errors.get(c.id)} for c in planned]
    for c in cells:  # a run's label names its fingerprint and settings, which only the plan knows in full
        if c["id"] in by_cell:
            by_cell[c["id"]].update(settings=c["settings"], method=c["fingerprint"])
    return list(by_cell.values()), cells


def fingerprint_name(fp: dict) -> str:
    """A fingerprint as the report names it: its method with its own settings where the matrix gives any
    ("subject-sentence (subjects=per-key decoy_rows=64)": two plantings of one method are two columns, not one), or
    for an existing model the method on its card and the folder's name ("perinucleus (n256)")."""
    if not fp.get("existing"):
        from meraser.utils import flat_keys

        settings = " ".join(f"{k}={v}" for k, v in flat_keys(fp.get("config") or {}).items()
                            if k != "seed")  # the matrix seed, which every cell names already
        return f"{fp['method']} ({settings})" if settings else fp["method"]
    folder = Path(fp["existing"])
    card = Path(fp.get("card") or folder / "fingerprint_card.json")
    try:
        method = read_json(card, "card").get("method") if card.is_file() else None
    except MeraserError:
        method = None
    return f"{method} ({folder.name})" if method and method not in folder.name else folder.name


def utility(run: dict) -> float | None:
    """The attacked model's utility relative to the fingerprinted model's: the mean of its perplexity ratio
    (fingerprinted / attacked), its ordinary-accuracy ratio and its mean task-accuracy ratio (attacked /
    fingerprinted, over the tasks both measured), of those measured."""
    st = run["stages"]
    fp, last = st.get("fingerprinted", {}), last_row(run)
    ratios = []
    if isinstance(fp.get("ppl"), dict) and isinstance(last.get("ppl"), dict):
        ratios.append(fp["ppl"]["ppl"] / last["ppl"]["ppl"])
    if fp.get("ordinary_accuracy") and last.get("ordinary_accuracy") is not None:
        ratios.append(last["ordinary_accuracy"] / fp["ordinary_accuracy"])
    before, after = task_accs(fp), task_accs(last)
    both = [t for t in before if t in after]
    if both and sum(before[t] for t in both) > 0:
        ratios.append(sum(after[t] for t in both) / sum(before[t] for t in both))
    return sum(ratios) / len(ratios) if ratios else None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def bench_time(path: str | Path, runs: list[dict], cells: list[dict]) -> str:
    """One line for a bench folder: cells done, their wall time, and that of the shared work they use."""
    from meraser.bench import Matrix, plan_cells, shared_work

    text = (f"{len(runs)} of {len(cells)} cells done, {_duration(sum(r.get('seconds') or 0 for r in runs))} of cell "
            f"time (each cell's own wall time, summed)")
    try:
        matrix = Matrix.from_dict(read_json(Path(path) / "matrix.json", "matrix record"))
        done = {r["name"] for r in runs}  # the shared work of cells still to run is not made yet
        seconds, unknown = shared_work(matrix, [c for c in plan_cells(matrix) if c.id in done])
    except MeraserError:
        return text
    if seconds or not unknown:
        text += f", plus {_duration(seconds)} of shared work (fingerprinted models, transfer adapter, merge experts)"
    return text + (f"; the shared work's time is not recorded for {', '.join(unknown)}" if unknown else "")


def strongest(runs: list[dict], verification: str) -> dict[str, dict]:
    """{fingerprint: run} the strongest attack on each fingerprint by one verification: of the cells that keep at
    least WIN_UTILITY of the fingerprinted model's utility, the one the verification scores lowest (shows the least
    ownership), ties to the higher utility. An attack that breaks the model is never the strongest; a fingerprint
    whose every cell does has none."""
    from meraser.evaluation.verifications import REGISTRY

    v, best = REGISTRY[verification], {}
    for r in runs:
        u, score = utility(r), v.score(last_row(r))
        if u is None or score is None or u < WIN_UTILITY or "attack" not in r:
            continue
        held = best.get(r["method"])
        if held is None or (score, -u) < (v.score(last_row(held)), -utility(held)):
            best[r["method"]] = r
    return best
