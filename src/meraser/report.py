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


def _outputs(runs: list[dict]) -> str:
    parts = []
    for run in runs:
        st = run["stages"]
        for stage in ("fingerprinted", "recovered", "attacked"):
            trig = st.get(stage, {}).get("per_trigger", [])
            if not trig:
                continue
            rows = "".join(f"<tr><td>{html.escape(t['trigger'][:80])}</td><td>{html.escape(t['target'])}</td>"
                           f"<td>{html.escape(t['output'])}</td><td>{'yes' if t['match'] else 'no'}</td></tr>"
                           for t in trig[:16])
            parts.append(f"<h3>{html.escape(run['name'])}: {stage}</h3><table><tr><th>trigger</th><th>target</th>"
                         f"<th>output</th><th>match</th></tr>{rows}</table>")
    return "\n".join(parts)


def render(runs: list[dict], title: str = "MEraser report") -> str:
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
<h2>Per-trigger outputs</h2>{_outputs(runs)}
</body></html>"""


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "MEraser report") -> Path:
    from meraser.utils import check_parents

    check_parents(out)
    runs = [load_run(d) for d in run_dirs]
    atomic_write_text(out, render(runs, title))
    return Path(out)
