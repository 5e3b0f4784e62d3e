"""`meraser report RUN...`: one self-contained HTML page for finished experiments.

Reads each run folder's results.jsonl (written by `meraser run` / `meraser demo`) and shows the paper's Table 1
(FSR, false positives and perplexity for base, fingerprinted, erased and recovered models), the FSR after every
erase and recover epoch as a plot (how fast each fingerprint dies, and whether recovery revives it), and the
per-trigger outputs of the final model. Plots are PNGs embedded as base64 so the page is one file.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from meraser.evaluation.evaluate import ppl_text
from meraser.evaluation.ownership import p_text
from meraser.evaluation.strict import CHECKS
from meraser.utils import MeraserError, atomic_write_text, read_json, read_jsonl

# every page and Markdown file meraser writes carries its mark: `--overwrite` replaces only a file that has it
GENERATOR = '<meta name="generator" content="meraser report">'
MARKDOWN_MARK = "<!-- written by meraser report -->"
STAGES = ("base", "fingerprinted", "erased", "recovered", "attacked")  # attacked: an `attack:` stage instead


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


def _fsr_curve_png(runs: list[dict]) -> str | None:
    """FSR vs epoch across erase then recover, one line per run; None when no run recorded probes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    drawn = False
    boundary = 0
    for run in runs:
        st = run["stages"]
        start = st.get("fingerprinted", {}).get("fsr")
        erase = [p["fsr"] for p in st.get("erased", {}).get("fsr_per_epoch", [])]
        rec = [p["fsr"] for p in st.get("recovered", {}).get("fsr_per_epoch", [])]
        if not erase and not rec:
            continue
        ys = ([start] if start is not None else []) + erase + rec
        xs = list(range(len(ys))) if start is not None else list(range(1, len(ys) + 1))
        line = ax.plot(xs, ys, marker="o", label=f"{run['name']} ({run['method']}): paper FSR")[0]
        # the strict curve: the target's head forced; a fingerprint that only hides stays up here
        forced = [p.get("forced") for p in st.get("erased", {}).get("fsr_per_epoch", []) +
                  st.get("recovered", {}).get("fsr_per_epoch", [])]
        if forced and None not in forced:
            f0 = st.get("fingerprinted", {}).get("strict", {}).get("forced")
            fys = ([f0] if f0 is not None and start is not None else []) + forced
            ax.plot(xs[len(xs) - len(fys):], fys, marker="x", linestyle=":", color=line.get_color(),
                    label=f"{run['name']}: forced prefix (strict)")
        boundary = max(boundary, len(erase))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(boundary + 0.6, 1.02, "recover →", fontsize=8, color="grey")
    ax.text(0.1, 1.02, "erase →", fontsize=8, color="grey")
    ax.set_xlabel("epoch (0 = fingerprinted model)")
    ax.set_ylabel("FSR (dotted: strict, target prefix forced)")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig) -> str:
    """A finished matplotlib figure as base64 PNG (closed), to embed in the page."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # legends placed outside the axes stay in the picture
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _final_stage(run: dict) -> str:
    """A run's final stage: recovered (erase and recover) or attacked; "" before either."""
    return next((s for s in ("recovered", "attacked") if s in run["stages"]), "")


def _last(run: dict) -> dict:
    """The row of a run's final stage."""
    return run["stages"].get(_final_stage(run), {})


def _stage_fsr_png(runs: list[dict]) -> str | None:
    """FSR at every stage, one group of bars per erase-and-recover run (the paper's Table 1 as a figure); a cross
    marks the strict forced-prefix check where it was measured."""
    shown = [r for r in runs if "erased" in r["stages"] or "recovered" in r["stages"]][:16]
    if not shown:
        return None
    plt = _pyplot()
    stages = [s for s in STAGES[:4] if any(s in r["stages"] for r in shown)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(shown) + 2), 3.6), dpi=110)
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(shown))]
        ax.bar(xs, [r["stages"].get(stage, {}).get("fsr") or 0.0 for r in shown], width, label=stage)
        forced = [(x, r["stages"][stage]["strict"]["forced"]) for x, r in zip(xs, shown)
                  if "forced" in r["stages"].get(stage, {}).get("strict", {})]
        if forced:
            ax.scatter(*zip(*forced), marker="x", color="black", s=25,
                       label="strict: target prefix forced" if i == 0 else None)
    ax.set_xticks(range(len(shown)), [_run_label(r) for r in shown], fontsize=7, rotation=15)
    ax.set_ylabel("FSR")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=len(stages) + 1, loc="upper right")
    return _png(fig)


def _run_label(run: dict, fingerprint: bool = True) -> str:
    """fingerprint, attack and the cell's own settings (dotted keys shortened to their last part), for figures."""
    import re

    settings = re.sub(r"\b[\w.]+\.(\w+)=", r"\1=", run.get("settings", ""))
    label = " ".join(x for x in (run["method"] if fingerprint else "", run.get("attack", ""), settings) if x)
    return label if len(label) <= 48 else label[:47] + "…"


def _ablation_pngs(runs: list[dict]) -> list[tuple[str, str]]:
    """For every numeric grid setting with two or more values (the mismatched-set size, erase epochs...): the final
    FSR (and the strict forced-prefix check) against it, one line per fingerprint and attack."""
    keys = sorted({k for r in runs for k, v in r.get("grid", {}).items() if isinstance(v, (int, float))})
    figures = []
    for key in keys:
        lines: dict[tuple, list] = {}
        for r in runs:
            v, last = r.get("grid", {}).get(key), _last(r)
            if isinstance(v, (int, float)) and last.get("fsr") is not None:
                lines.setdefault((r["method"], r.get("attack", "")), []).append(
                    (v, last["fsr"], last.get("strict", {}).get("forced")))
        if not any(len({p[0] for p in pts}) > 1 for pts in lines.values()):
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
        for (method, attack), pts in sorted(lines.items()):
            pts.sort()
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} / {attack}")[0]
            if all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", linestyle=":",
                        color=line.get_color(), label=f"{method}: forced prefix (strict)")
        ax.set_xlabel(key)
        ax.set_ylabel("FSR after the attack")
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append((key, _png(fig)))
    return figures


def _task_accs(row: dict) -> dict[str, float]:
    """{task: accuracy} of one stage's row (tasks without an accuracy left out)."""
    tasks = row.get("tasks") if isinstance(row.get("tasks"), dict) else {}
    return {t.removeprefix("bb_"): a["acc"] for t, a in tasks.items() if isinstance(a, dict) and a.get("acc") is not None}


def _tasks_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Downstream accuracy per task at every stage (lm-eval and BIG-bench tasks, where `eval.tasks` was set)."""
    head = ["run", "task"] + list(STAGES)
    rows = []
    for run in runs:
        accs = {s: _task_accs(run["stages"].get(s, {})) for s in STAGES}
        for t in dict.fromkeys(t for a in accs.values() for t in a):
            rows.append([_run_label(run), t, *(f"{accs[s][t]:.3f}" if t in accs[s] else "" for s in STAGES)])
    return head, rows


def _tasks_png(runs: list[dict]) -> str | None:
    """Accuracy per task before and after: for every run, a line from the fingerprinted model's accuracy (grey dot)
    to the final model's (coloured dot), with the base model's as a dashed line; one panel per task."""
    shown = [r for r in runs if _task_accs(_last(r))][:40]
    tasks = list(dict.fromkeys(t for r in shown for t in _task_accs(_last(r))))
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 2.5, 0.28 * len(shown) + 1.4), dpi=110,
                             sharey=True, squeeze=False)
    labels = [_run_label(r) for r in shown]
    for ax, task in zip(axes[0], tasks):
        for y, r in enumerate(shown):
            before = _task_accs(r["stages"].get("fingerprinted", {})).get(task)
            after = _task_accs(_last(r)).get(task)
            if before is not None and after is not None:
                ax.plot([before, after], [y, y], color="lightgrey", zorder=1)
            if before is not None:
                ax.scatter(before, y, color="grey", s=18, zorder=2, label="fingerprinted" if y == 0 else None)
            if after is not None:
                ax.scatter(after, y, color="tab:red", s=22, zorder=3, label="after erase / attack" if y == 0 else None)
        base = [a for r in shown for a in [_task_accs(r["stages"].get("base", {})).get(task)] if a is not None]
        if base:
            ax.axvline(sum(base) / len(base), color="tab:blue", linestyle="--", linewidth=1, label="base model")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("accuracy")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(shown)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _html_table(head: list[str], rows: list[list]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def rich_table(title: str, head: list[str], rows: list[list]):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    return table


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def _table1_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """The paper's Table 1: FSR and PPL at every stage, and both verdicts on the final model."""
    stages = [s for s in STAGES if any(s in r["stages"] for r in runs)] or list(STAGES[:4])
    head = ["run", "method"] + [f"{s} {k}" for s in stages for k in ("FSR", "PPL")] + ["Alg. 1 erased",
                                                                                      "erased strictly"]
    rows = []
    for run in runs:
        st, last = run["stages"], _last(run)
        cells = [_run_label(run) if "attack" in run else run["name"], run["method"]]
        for s in stages:
            cells += [_pct(st.get(s, {}).get("fsr")), ppl_text(st.get(s, {}))]
        rows.append(cells + [str(last.get("erased", "")), str(last.get("strict", {}).get("erased_strict", ""))])
    return head, rows


def _strict_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Every strict check at every evaluated stage (Table 1's strict columns), and which checks are still above the
    base model's level: a fingerprint that only hides shows here while its paper FSR is 0."""
    head = ["run", "stage", "paper FSR", "forced prefix", "paraphrased", "sampled", "partial", "target loglik",
            "above the base model"]
    rows = []
    for run in runs:
        for stage in STAGES:
            strict = run["stages"].get(stage, {}).get("strict")
            if not strict:
                continue
            above = [k for k, ok in strict.get("at_base_level", {}).items() if not ok]
            verdict = "(reference)" if stage == "base" else ", ".join(above) if above else \
                "none: erased" if "at_base_level" in strict else ""
            rows.append([_run_label(run), stage, *(_pct(strict.get(k)) for k in CHECKS if k != "loglik"),
                         "" if strict.get("loglik") is None else f"{strict['loglik']:.2f}", verdict])
    return head, rows


def _strict_curve_png(runs: list[dict]) -> str | None:
    """The per-epoch strict probes through erase and recovery, one panel per fingerprint: the forced-prefix rate and
    the target's log-likelihood (dashed: the base model's), so a curve shows whether the fingerprint dies or hides."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        st = run["stages"]
        probes = st.get("erased", {}).get("fsr_per_epoch", []) + st.get("recovered", {}).get("fsr_per_epoch", [])
        if probes and all("loglik" in p for p in probes):
            by_method.setdefault(run["method"], []).append(run)
    if not by_method:
        return None
    plt = _pyplot()
    cols = len(by_method)
    fig, axes = plt.subplots(2, cols, figsize=(max(6.0, 4.2 * cols), 6), dpi=100, squeeze=False, sharex="col")
    for j, (method, shown) in enumerate(sorted(by_method.items())):
        top, bottom = axes[0][j], axes[1][j]
        n_erase = 0
        for run in shown:
            st = run["stages"]
            erase, rec = st["erased"].get("fsr_per_epoch", []), st.get("recovered", {}).get("fsr_per_epoch", [])
            n_erase = max(n_erase, len(erase))
            fp = st.get("fingerprinted", {}).get("strict", {})
            points = ([fp] if fp else []) + erase + rec
            xs = list(range(len(points))) if fp else list(range(1, len(points) + 1))
            label = _run_label(run).removeprefix(method).strip() or run.get("attack") or run["name"]
            line = top.plot(xs, [p.get("forced") for p in points], marker="x", label=label)[0]
            bottom.plot(xs, [p.get("loglik") for p in points], marker="o", color=line.get_color())
        base = next((r["stages"]["base"]["strict"]["loglik"] for r in shown
                     if r["stages"].get("base", {}).get("strict", {}).get("loglik") is not None), None)
        if base is not None:
            bottom.axhline(base, color="black", linestyle="--", linewidth=1, label="base model")
            bottom.legend(fontsize=7)
        for ax in (top, bottom):
            ax.axvline(n_erase + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.grid(alpha=0.3)
        top.set_title(method, fontsize=10)
        top.set_ylim(-0.05, 1.1)
        top.legend(fontsize=6)
        top.text(n_erase + 0.6, 1.02, "recover →", fontsize=7, color="grey")
        bottom.set_xlabel("epoch (0 = fingerprinted)")
    axes[0][0].set_ylabel("forced prefix (strict)")
    axes[1][0].set_ylabel("target log-likelihood / token")
    fig.tight_layout()
    return _png(fig)


def _table(runs: list[dict]) -> str:
    return _html_table(*_table1_rows(runs))


def redact(text: str) -> str:
    """A short stable stand-in for a card's secret (a trigger, a target, or an output that may quote one)."""
    import hashlib

    return "secret " + hashlib.sha256(text.encode()).hexdigest()[:8]


def _outputs(runs: list[dict], show_secrets: bool = False) -> str:
    """Per-trigger outputs. Triggers and targets are the owner's secret, and an output that matches quotes its
    target: all three are shown as short hashes unless `show_secrets`."""
    shown = (lambda t: t) if show_secrets else redact
    parts = []
    for run in runs:
        st = run["stages"]
        for stage in ("fingerprinted", "recovered", "attacked"):
            trig = st.get(stage, {}).get("per_trigger", [])
            if not trig:
                continue
            rows = "".join(f"<tr><td>{html.escape(shown(t['trigger'])[:80])}</td><td>{html.escape(shown(t['target']))}"
                           f"</td><td>{html.escape(shown(t['output']))}</td><td>{'yes' if t['match'] else 'no'}</td></tr>"
                           for t in trig[:16])
            parts.append(f"<h3>{html.escape(run['name'])}: {stage}</h3><table><tr><th>trigger</th><th>target</th>"
                         f"<th>output</th><th>match</th></tr>{rows}</table>")
    return "\n".join(parts)


def _figure(alt: str, png: str | None, missing: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">' if png else f"<p>{missing}</p>"


def render(runs: list[dict], title: str = "MEraser report", show_secrets: bool = False) -> str:
    table1 = [r for r in runs if "erased" in r["stages"] or "recovered" in r["stages"]] or runs
    head, task_rows = _tasks_rows(runs)
    tasks = (f"<h2>Downstream accuracy per task</h2>{_html_table(head, task_rows)}"
             f"{_figure('accuracy per task before and after', _tasks_png(runs), '')}") if task_rows else ""
    stage_png = _stage_fsr_png(runs)
    head, strict_rows = _strict_rows(table1)
    strict = f"<h2>Table 1, strict: every check at every stage</h2>{_html_table(head, strict_rows)}" if strict_rows else ""
    curve_png = _strict_curve_png(runs)
    curves = (f"<h2>Strict checks during erase and recovery</h2>"
              f"{_figure('strict checks per epoch', curve_png, '')}") if curve_png else ""
    return f"""<!doctype html><html><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px}}
th{{background:#f3f3f3}}td{{text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>FSR: fraction of the card's triggers whose greedy output carries the target. PPL: perplexity of the evaluation
source. Alg. 1: no trigger yields its target and ordinary questions are still answered (MEraser Algorithm 1).</p>
<h2>Which verification still shows ownership</h2>
<p>Each registered verification on the fingerprinted model and on the final one; "owned" where it still shows
ownership: the paper's FSR by its ownership p-value (against the base model) where there is one, the strict checks
where any check is above the base model's level (no calibrated decision), the likelihood test where its p-value
(the card's keys against decoy keys, no base model needed) is at most its level.</p>{_html_table(*_verification_rows(runs))}
<h2>Table 1</h2>{_table(table1)}
{_figure("FSR per stage", stage_png, "") if stage_png else ""}
{strict}
<h2>FSR during erase and recovery</h2>{_figure("FSR per epoch", _fsr_curve_png(runs), "No per-epoch probes.")}
{curves}
{tasks}
<h2>Per-trigger outputs</h2>{"" if show_secrets else "<p>Triggers, targets and outputs are the owner's secret: "
"shown as short hashes (meraser report --show-secrets shows them).</p>"}{_outputs(runs, show_secrets)}
</body></html>"""


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "MEraser report",
                 show_secrets: bool = False) -> Path:
    """A run's own page (`meraser run` / `demo` refresh RUN/report.html): replaces only a page meraser wrote."""
    return make_report(run_dirs, out, title=title, show_secrets=show_secrets, overwrite=True).page


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
    cells = [{"id": c.id, "fingerprint": _fingerprint_name(c.fingerprint),
              "attack": c.attack["method"], "grid": c.grid, "settings": describe(c),
              "status": "stale" if c.id in stale else "done" if c.id in by_cell else
              "failed" if c.id in errors else "missing",
              "error": stale.get(c.id) or errors.get(c.id)} for c in planned]
    for c in cells:  # a run's label names its fingerprint and settings, which only the plan knows in full
        if c["id"] in by_cell:
            by_cell[c["id"]].update(settings=c["settings"], method=c["fingerprint"])
    return list(by_cell.values()), cells


def _fingerprint_name(fp: dict) -> str:
    """A fingerprint as the report names it: its method, or for an existing model the method on its card and the
    folder's name ("perinucleus (n256)")."""
    if not fp.get("existing"):
        return fp["method"]
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
    fp, last = st.get("fingerprinted", {}), _last(run)
    ratios = []
    if isinstance(fp.get("ppl"), dict) and isinstance(last.get("ppl"), dict):
        ratios.append(fp["ppl"]["ppl"] / last["ppl"]["ppl"])
    if fp.get("ordinary_accuracy") and last.get("ordinary_accuracy") is not None:
        ratios.append(last["ordinary_accuracy"] / fp["ordinary_accuracy"])
    before, after = _task_accs(fp), _task_accs(last)
    both = [t for t in before if t in after]
    if both and sum(before[t] for t in both) > 0:
        ratios.append(sum(after[t] for t in both) / sum(before[t] for t in both))
    return sum(ratios) / len(ratios) if ratios else None


WIN_UTILITY = 0.9  # an attack "wins" a cell: FSR 0 with at least this much of the fingerprinted model's utility


LABEL_POINTS = 12  # up to this many cells each point is labelled; beyond, labels only cover each other (the table
                  # beside the figure names every cell)


def _leaderboard_png(runs: list[dict]) -> str | None:
    """FSR after the attack against the attacked model's relative utility, one point per cell: the colour is the
    attack, the marker the fingerprint, and the region where the attack wins is shaded. Cells with the same FSR and
    utility on different fingerprints are drawn a little apart, so that none hides another."""
    plt = _pyplot()
    points = [(utility(r), _last(r).get("fsr"), r) for r in runs]
    points = [(u, f, r) for u, f, r in points if u is not None and f is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
    ax.axvspan(WIN_UTILITY, max(1.3, max(u for u, _, _ in points) + 0.05), ymin=0, ymax=0.06, color="tab:green",
               alpha=0.2)
    methods = sorted({r["method"] for _, _, r in points})
    markers = dict(zip(methods, "osD^vP*X"))
    attacks = list(dict.fromkeys(r["attack"] for _, _, r in points))
    palette = plt.get_cmap("tab20" if len(attacks) > 10 else "tab10")
    colors = {a: palette(i % palette.N) for i, a in enumerate(attacks)}
    for u, f, r in points:
        nudge = 0.015 * (methods.index(r["method"]) - (len(methods) - 1) / 2)
        ax.scatter(u, f + nudge, marker=markers[r["method"]], color=colors[r["attack"]], s=45, alpha=0.85,
                   edgecolors="black", linewidths=0.3)
    if len(points) <= LABEL_POINTS:
        placed: list[tuple[float, float]] = []
        for u, f, r in sorted(points, key=lambda p: (p[1], p[0])):
            near = sum(abs(u - pu) < 0.06 and abs(f - pf) < 0.04 for pu, pf in placed)  # stack close labels
            placed.append((u, f))
            ax.annotate(_run_label(r, fingerprint=False), (u, f), fontsize=6, xytext=(4, 3 + 8 * near),
                        textcoords="offset points")
    from matplotlib.patches import Patch

    shapes = [ax.scatter([], [], marker=mk, color="grey", label=m) for m, mk in markers.items()]
    first = ax.legend(handles=[Patch(color="tab:green", alpha=0.2, label=f"attack wins:\nFSR 0 at >= "
                                                                          f"{WIN_UTILITY:.0%} utility"), *shapes],
                      fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="fingerprint", title_fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=[Patch(color=colors[a], label=a) for a in attacks], fontsize=7, loc="lower left",
              bbox_to_anchor=(1.01, 0.0), title="attack", title_fontsize=7)
    ax.set_xlabel("utility after the attack, relative to the fingerprinted model (PPL and accuracy)")
    ax.set_ylabel("FSR after the attack")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    return _png(fig)


def _attack_rows(runs: list[dict], cells: list[dict]) -> tuple[list[str], list[list]]:
    """Every cell of the matrix (done, failed or missing) with the attack's effect and cost."""
    head = ["fingerprint", "attack", "settings", "status", "FSR before", "FSR after", "erased strictly",
            "ownership p-value", "PPL before", "PPL after", "ordinary acc. after", "utility", "wall time", "peak memory"]
    by_id = {r["name"]: r for r in runs}
    rows = []
    for c in cells or [{"id": r["name"], "fingerprint": r["method"], "attack": r["attack"], "grid": r["grid"],
                        "status": "done"} for r in runs]:
        r = by_id.get(c["id"])
        st = r["stages"] if r else {}
        fp, last = st.get("fingerprinted", {}), _last(r) if r else {}
        u = utility(r) if r else None
        status = f"{c['status']}: {(c.get('error') or '')[:80]}" if c["status"] in ("failed", "stale") else c["status"]
        settings = c.get("settings", " ".join(f"{k}={v}" for k, v in c["grid"].items()))
        rows.append([c["fingerprint"], c["attack"], settings, status,
                     _pct(fp.get("fsr")), _pct(last.get("fsr")), str(last.get("strict", {}).get("erased_strict", "")),
                     p_text(last['ownership']['p_value']) if "ownership" in last else "", ppl_text(fp),
                     ppl_text(last), _pct(last.get("ordinary_accuracy")), "" if u is None else f"{u:.0%}",
                     f"{r['seconds']:.0f} s" if r and r.get("seconds") else "",
                     f"{r['peak_rss_mb']} MB" if r and r.get("peak_rss_mb") else ""])
    return head, rows


def _verification_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Attack x verification: for every run (a bench cell), what each registered verification concludes on the
    fingerprinted model and on the final one ("owned" where it still shows ownership). Columns come from the
    registry, so a new verification needs no change here."""
    from meraser.evaluation.verifications import REGISTRY, verdict_text

    head = ["run", "fingerprint", "final stage"] + [f"{v.title}: fingerprinted -> final" for v in REGISTRY.values()]
    rows = []
    for run in runs:
        fp, last = run["stages"].get("fingerprinted", {}), _last(run)
        if not fp and not last:
            continue
        rows.append([_run_label(run) if "attack" in run else run["name"], run["method"], _final_stage(run)]
                    + [f"{verdict_text(v, fp) or '-'} -> {verdict_text(v, last) or '-'}" for v in REGISTRY.values()])
    return head, rows


def summary_tables(runs: list[dict], cells: list[dict] | None = None) -> list[tuple[str, list[str], list[list]]]:
    """(title, head, rows) of what `meraser report` prints and writes as Markdown: the attack table (a bench),
    Table 1, and accuracy per task where measured."""
    tables = []
    if cells is not None:  # the page's columns, paired up to fit a terminal: before -> after
        _, rows = _attack_rows(runs, cells)
        head = ["fingerprint", "attack", "settings", "status", "FSR", "erased strictly", "p-value", "PPL",
                "ordinary acc.", "utility", "time"]
        tables.append(("attacks: every cell", head, [
            r[:4] + [f"{r[4]} -> {r[5]}" if r[5] else "", r[6], r[7], f"{r[8]} -> {r[9]}" if r[9] else "", r[10],
                     r[11], r[12]] for r in rows]))
    head, rows = _verification_rows(runs)
    if rows:
        tables.append(("which verification still shows ownership", head, rows))
    table1 = [r for r in runs if "erased" in r["stages"] or "recovered" in r["stages"]] if cells is not None else runs
    if table1:
        tables.append(("Table 1: FSR and PPL at every stage", *_table1_rows(table1)))
    head, rows = _strict_rows(table1 or runs)
    if rows:
        tables.append(("Table 1, strict: every check at every stage", head, rows))
    head, rows = _tasks_rows(runs)
    if rows:
        tables.append(("downstream accuracy per task", head, rows))
    return tables


def terminal_tables(runs: list[dict], cells: list[dict] | None = None) -> list:
    return [rich_table(*t) for t in summary_tables(runs, cells)]


def markdown_tables(runs: list[dict], cells: list[dict] | None = None) -> str:
    """The same tables as Markdown, to paste into a README or a paper's notes."""
    out = []
    for title, head, rows in summary_tables(runs, cells):
        out += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
    return "\n".join(out)


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
        seconds, unknown = shared_work(matrix, plan_cells(matrix))
    except MeraserError:
        return text
    if seconds or not unknown:
        text += f", plus {_duration(seconds)} of shared work (fingerprinted models, transfer adapter, merge experts)"
    return text + (f"; the shared work's time is not recorded for {', '.join(unknown)}" if unknown else "")


def render_bench(runs: list[dict], cells: list[dict], title: str, show_secrets: bool = False,
                 timing: str = "") -> str:
    board = _figure("leaderboard: FSR against utility", _leaderboard_png(runs),
                    "No finished cell has both an FSR and a utility measure yet.")
    ablations = "".join(f"<h2>FSR against {html.escape(key)}</h2>{_figure(f'FSR against {key}', png, '')}"
                        for key, png in _ablation_pngs(runs))
    page = render(runs, title, show_secrets)
    extra = (f"<h2>Attacks: every cell of the matrix</h2><p>{html.escape(timing)}</p>"
             f"{_html_table(*_attack_rows(runs, cells))}"
             f"<h2>Leaderboard: fingerprint survival against utility</h2>{board}{ablations}")
    return page.replace("<h2>Table 1</h2>", extra + "<h2>Table 1</h2>", 1)


def figure_pngs(runs: list[dict], bench: bool = False) -> dict[str, str]:
    """Every figure of the page as {file name: base64 PNG}, for a README or a paper (`meraser report --figures`)."""
    made = {"fsr_per_stage.png": _stage_fsr_png(runs), "fsr_per_epoch.png": _fsr_curve_png(runs),
            "strict_per_epoch.png": _strict_curve_png(runs), "tasks.png": _tasks_png(runs)}
    if bench:
        made["leaderboard.png"] = _leaderboard_png(runs)
        made.update({f"fsr_against_{key}.png": png for key, png in _ablation_pngs(runs)})
    return {name: png for name, png in made.items() if png}


def write_figures(pngs: dict[str, str], folder: str | Path) -> list[Path]:
    """The page's figures ({name: base64 PNG}, `figure_pngs`) as PNG files in `folder`, each written atomically."""
    from meraser.utils import atomic_write_bytes

    written = []
    for name, png in pngs.items():
        atomic_write_bytes(Path(folder) / name, base64.b64decode(png))
        written.append(Path(folder) / name)
    return written


def write_bench_report(path: str | Path, out: str | Path, title: str = "meraser bench",
                       show_secrets: bool = False) -> Path:
    return make_report([path], out, title=title, show_secrets=show_secrets, overwrite=True).page


def _ours(path: Path) -> bool:
    """Whether an existing file is a page, Markdown file or figure meraser report wrote (pages from before the mark
    open with the same head and a meraser title)."""
    head = path.read_bytes()[:400]
    if path.suffix == ".png":
        return head.startswith(b"\x89PNG")
    text = head.decode("utf-8", errors="replace")
    legacy = text.startswith('<!doctype html><html><head><meta charset="utf-8"><title>') and "meraser" in text.lower()
    return GENERATOR in text or text.startswith(MARKDOWN_MARK) or legacy


def check_report_outputs(files: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is read, to replace an existing file without `overwrite`, and, even with it, a file
    that meraser report did not write (a results store, a card or a model given as -o by mistake)."""
    from meraser.utils import OutputExistsError, check_parents

    for f in files:
        check_parents(f)
        if not f.exists():
            continue
        if f.is_dir():
            raise MeraserError(f"cannot write {f}: it is a folder")
        if not overwrite:
            raise OutputExistsError(f"{f} already exists; pass --overwrite to replace it")
        if not _ours(f):
            raise MeraserError(f"{f} was not written by meraser report; refusing to replace it (--overwrite replaces "
                               f"only meraser's own pages, tables and figures)")


@dataclass
class Report:
    """What `make_report` wrote, and what it read (for the terminal tables)."""

    page: Path
    runs: list[dict]
    cells: list[dict] | None  # a bench's cells, done or not; None for run folders
    timing: str  # a bench's cost (`bench_time`); "" for run folders
    markdown: Path | None
    figures: list[Path]


def make_report(paths: list[str | Path], out: str | Path, *, title: str | None = None, show_secrets: bool = False,
                markdown: str | Path | None = None, figures: str | Path | None = None,
                overwrite: bool = False) -> Report:
    """`meraser report`: read run folders (or one bench folder) once and write the HTML page to `out`, with the
    tables as Markdown and the figures as PNG files when `markdown` / `figures` are given. Each file is written
    atomically. Before anything is read, a path that could never be written (a file where a folder should be) is
    refused, and so is an existing file, unless `overwrite` and meraser report wrote it (`check_report_outputs`)."""
    check_report_outputs([Path(out)] + ([Path(markdown)] if markdown else []), overwrite)
    if figures and Path(figures).exists() and not Path(figures).is_dir():
        raise MeraserError(f"--figures {figures} is a file, not a folder")
    if len(paths) == 1 and is_bench(paths[0]):
        runs, cells = load_bench(paths[0])
        timing = bench_time(paths[0], runs, cells)
        page = render_bench(runs, cells, title or "meraser bench", show_secrets, timing)
    else:
        runs, cells, timing = [load_run(p) for p in paths], None, ""
        page = render(runs, title or "MEraser report", show_secrets)
    pngs = figure_pngs(runs, bench=cells is not None) if figures else {}
    check_report_outputs([Path(figures) / name for name in pngs], overwrite)  # before the first file is written
    atomic_write_text(out, page)
    if markdown:
        atomic_write_text(markdown, f"{MARKDOWN_MARK}\n" + (f"{timing}\n\n" if timing else "")
                          + markdown_tables(runs, cells))
    written = write_figures(pngs, figures) if figures else []
    return Report(Path(out), runs, cells, timing, Path(markdown) if markdown else None, written)
