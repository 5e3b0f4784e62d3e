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
from pathlib import Path

from meraser.evaluation.evaluate import ppl_text
from meraser.evaluation.ownership import p_text
from meraser.utils import MeraserError, atomic_write_text, read_json, read_jsonl

STAGES = ("base", "fingerprinted", "erased", "recovered", "attacked")  # attacked: an `attack:` stage instead


def load_run(path: str | Path) -> dict:
    """{name, method, stages: {stage: row}} of a run folder; refuses a folder without results."""
    p = Path(path)
    rows = read_jsonl(p / "results.jsonl")
    if not rows:
        raise MeraserError(f"{p}: no results.jsonl (is it a `meraser run` output folder?)")
    exp = read_json(p / "experiment.json", "experiment record") if (p / "experiment.json").exists() else {}
    fp = exp.get("fingerprint") or {}
    return {"name": p.name, "method": fp.get("existing") or fp.get("method", "?"), "model": exp.get("model", "?"),
            "stages": {r["stage"]: r for r in rows}}


def _fsr_curve_png(runs: list[dict]) -> str | None:
    """FSR vs epoch across erase then recover, one line per run; None when no run recorded probes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        # the strict curve: the target's first quarter forced; a fingerprint that only hides stays up here
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def _table(runs: list[dict]) -> str:
    head = ["run", "method"] + [f"{s} {k}" for s in STAGES for k in ("FSR", "PPL")] + ["Alg. 1 erased",
                                                                                      "erased strictly"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for run in runs:
        st = run["stages"]
        cells = [run["name"], run["method"]]
        for s in STAGES:
            r = st.get(s, {})
            cells += [_pct(r.get("fsr")), ppl_text(r)]
        last = st.get("recovered", st.get("attacked", {}))
        cells += [str(last.get("erased", "")), str(last.get("strict", {}).get("erased_strict", ""))]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


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


def render(runs: list[dict], title: str = "MEraser report", show_secrets: bool = False) -> str:
    png = _fsr_curve_png(runs)
    plot = f'<img alt="FSR per epoch" src="data:image/png;base64,{png}">' if png else "<p>No per-epoch probes.</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px}}
th{{background:#f3f3f3}}td{{text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>FSR: fraction of the card's triggers whose greedy output carries the target. PPL: perplexity of the evaluation
source. Alg. 1: no trigger yields its target and ordinary questions are still answered (MEraser Algorithm 1).</p>
<h2>Table 1</h2>{_table(runs)}
<h2>FSR during erase and recovery</h2>{plot}
<h2>Per-trigger outputs</h2>{"" if show_secrets else "<p>Triggers, targets and outputs are the owner's secret: "
"shown as short hashes (meraser report --show-secrets shows them).</p>"}{_outputs(runs, show_secrets)}
</body></html>"""


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "MEraser report",
                 show_secrets: bool = False) -> Path:
    from meraser.utils import check_parents

    check_parents(out)
    runs = [load_run(d) for d in run_dirs]
    atomic_write_text(out, render(runs, title, show_secrets))
    return Path(out)


# ---- a bench folder (`meraser bench`): one run per cell, plus the cells that are missing or failed ----

def is_bench(path: str | Path) -> bool:
    return (Path(path) / "matrix.json").is_file()


def load_bench(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(runs, cells): a run per finished cell (as `load_run` gives), and every cell of the matrix with its status:
    done, failed (with the error) or missing. A partial store is fine."""
    from meraser.bench import FAILED, RESULTS, Matrix, plan_cells

    p = Path(path)
    by_cell: dict[str, dict] = {}
    for r in read_jsonl(p / RESULTS, "results store", torn_tail_ok=True):
        run = by_cell.setdefault(r["cell"], {"name": r["cell"], "method": r["fingerprint"], "attack": r["attack"],
                                             "model": r["model"], "grid": r.get("grid", {}), "stages": {},
                                             "seconds": r.get("cell_seconds"), "peak_rss_mb": r.get("peak_rss_mb")})
        run["stages"][r["stage"]] = r
    errors = {f["cell"]: f["error"] for f in read_jsonl(p / FAILED, "failure log", torn_tail_ok=True)}
    try:
        planned = plan_cells(Matrix.from_dict(read_json(p / "matrix.json", "matrix record")))
    except MeraserError:  # the matrix names something this installation no longer has: show what was stored
        planned = []
    cells = [{"id": c.id, "fingerprint": c.fingerprint.get("method") or Path(c.fingerprint["existing"]).name,
              "attack": c.attack["method"], "grid": c.grid,
              "status": "done" if c.id in by_cell else "failed" if c.id in errors else "missing",
              "error": errors.get(c.id)} for c in planned]
    return list(by_cell.values()), cells


def utility(run: dict) -> float | None:
    """The attacked model's utility relative to the fingerprinted model's: the mean of its perplexity ratio
    (fingerprinted / attacked) and its ordinary-accuracy ratio (attacked / fingerprinted), of those measured."""
    st = run["stages"]
    fp, last = st.get("fingerprinted", {}), st.get("recovered", st.get("attacked", {}))
    ratios = []
    if isinstance(fp.get("ppl"), dict) and isinstance(last.get("ppl"), dict):
        ratios.append(fp["ppl"]["ppl"] / last["ppl"]["ppl"])
    if fp.get("ordinary_accuracy") and last.get("ordinary_accuracy") is not None:
        ratios.append(last["ordinary_accuracy"] / fp["ordinary_accuracy"])
    return sum(ratios) / len(ratios) if ratios else None


WIN_UTILITY = 0.9  # an attack "wins" a cell: FSR 0 with at least this much of the fingerprinted model's utility


def _leaderboard_png(runs: list[dict]) -> str | None:
    """FSR after the attack against the attacked model's relative utility, one point per cell; the region where
    the attack wins is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(utility(r), r["stages"].get("recovered", r["stages"].get("attacked", {})).get("fsr"), r)
              for r in runs]
    points = [(u, f, r) for u, f, r in points if u is not None and f is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.axvspan(WIN_UTILITY, max(1.3, max(u for u, _, _ in points) + 0.05), ymin=0, ymax=0.06, color="tab:green",
               alpha=0.2, label=f"attack wins: FSR 0 at >= {WIN_UTILITY:.0%} utility")
    markers = dict(zip(sorted({r["method"] for _, _, r in points}), "osD^vP*X"))
    for u, f, r in points:
        ax.scatter(u, f, marker=markers[r["method"]], s=50)
        ax.annotate(r["attack"], (u, f), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for m, mk in markers.items():
        ax.scatter([], [], marker=mk, color="grey", label=m)
    ax.set_xlabel("utility after the attack, relative to the fingerprinted model (PPL and accuracy)")
    ax.set_ylabel("FSR after the attack")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _attack_table(runs: list[dict], cells: list[dict]) -> str:
    head = ["fingerprint", "attack", "settings", "status", "FSR before", "FSR after", "erased strictly",
            "ownership p-value", "PPL before", "PPL after", "ordinary acc. after", "utility", "wall time", "peak memory"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    by_id = {r["name"]: r for r in runs}
    for c in cells or [{"id": r["name"], "fingerprint": r["method"], "attack": r["attack"], "grid": r["grid"],
                        "status": "done"} for r in runs]:
        r = by_id.get(c["id"])
        st = r["stages"] if r else {}
        fp, last = st.get("fingerprinted", {}), st.get("recovered", st.get("attacked", {}))
        u = utility(r) if r else None
        status = c["status"] if c["status"] != "failed" else f"failed: {(c.get('error') or '')[:80]}"
        cells_ = [c["fingerprint"], c["attack"], " ".join(f"{k}={v}" for k, v in c["grid"].items()), status,
                  _pct(fp.get("fsr")), _pct(last.get("fsr")), str(last.get("strict", {}).get("erased_strict", "")),
                  p_text(last['ownership']['p_value']) if "ownership" in last else "", ppl_text(fp), ppl_text(last),
                  _pct(last.get("ordinary_accuracy")), "" if u is None else f"{u:.0%}",
                  f"{r['seconds']:.0f} s" if r and r.get("seconds") else "",
                  f"{r['peak_rss_mb']} MB" if r and r.get("peak_rss_mb") else ""]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells_) + "</tr>")
    return "\n".join(out + ["</table>"])


def render_bench(runs: list[dict], cells: list[dict], title: str, show_secrets: bool = False) -> str:
    png = _leaderboard_png(runs)
    board = (f'<img alt="leaderboard: FSR against utility" src="data:image/png;base64,{png}">' if png
             else "<p>No finished cell has both an FSR and a utility measure yet.</p>")
    page = render(runs, title, show_secrets)
    extra = (f"<h2>Attacks: every cell of the matrix</h2>{_attack_table(runs, cells)}"
             f"<h2>Leaderboard: fingerprint survival against utility</h2>{board}")
    return page.replace("<h2>Table 1</h2>", extra + "<h2>Table 1</h2>", 1)


def write_bench_report(path: str | Path, out: str | Path, title: str = "meraser bench",
                       show_secrets: bool = False) -> Path:
    from meraser.utils import check_parents

    check_parents(out)
    runs, cells = load_bench(path)
    atomic_write_text(out, render_bench(runs, cells, title, show_secrets))
    return Path(out)
