"""`meraser report RUN...`: one self-contained HTML page for finished experiments.

Reads each run folder's results.jsonl (written by `meraser run` / `meraser demo`) and shows the paper's Table 1
(FSR, false positives and perplexity for base, fingerprinted, erased and recovered models), the FSR after every
erase and recover epoch as a plot (how fast each fingerprint dies, and whether recovery revives it), and the
per-trigger outputs of the final model. Plots are PNGs embedded as base64 so the page is one file.

The page is put together here; what it reads is in `data`, its tables in `tables`, its figures in `figures`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from meraser.report.data import (WIN_UTILITY, bench_time, fingerprint_name, is_bench, load_bench, load_run,
                                 utility)
from meraser.report.figures import (ablation_pngs, figure_pngs, fsr_curve_png, leaderboard_pngs, stage_fsr_png,
                                    strict_curve_png, tasks_png, write_figures)
from meraser.report.tables import (attack_rows, html_table, markdown_tables, strict_rows, strongest_rows, summary_tables,
                                   survival_rows, table1_html, tasks_rows, terminal_tables, verification_rows)
from meraser.utils import MeraserError, atomic_write_text

# what the CLI, the runner, the bench and the tests use
__all__ = ["GENERATOR", "MARKDOWN_MARK", "bench_time", "check_report_outputs", "fingerprint_name", "load_bench",
           "make_report", "summary_tables", "terminal_tables", "utility", "write_bench_report", "write_report"]

# every page and Markdown file meraser writes carries its mark: `--overwrite` replaces only a file that has it
GENERATOR = '<meta name="generator" content="meraser report">'
MARKDOWN_MARK = "<!-- written by meraser report -->"


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
    head, task_rows = tasks_rows(runs)
    tasks = (f"<h2>Downstream accuracy per task</h2>{html_table(head, task_rows)}"
             f"{_figure('accuracy per task before and after', tasks_png(runs), '')}") if task_rows else ""
    stage_png = stage_fsr_png(runs)
    head, strict_body = strict_rows(table1)
    strict = f"<h2>Table 1, strict: every check at every stage</h2>{html_table(head, strict_body)}" if strict_body else ""
    curve_png = strict_curve_png(runs)
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
(the card's keys against decoy keys, no base model needed) is at most its level.</p>{html_table(*verification_rows(runs))}
<h2>Table 1</h2>{table1_html(table1)}
{_figure("FSR per stage", stage_png, "") if stage_png else ""}
{strict}
<h2>FSR during erase and recovery</h2>{_figure("FSR per epoch", fsr_curve_png(runs), "No per-epoch probes.")}
{curves}
{tasks}
<h2>Per-trigger outputs</h2>{"" if show_secrets else "<p>Triggers, targets and outputs are the owner's secret: "
"shown as short hashes (meraser report --show-secrets shows them).</p>"}{_outputs(runs, show_secrets)}
</body></html>"""


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "MEraser report",
                 show_secrets: bool = False) -> Path:
    """A run's own page (`meraser run` / `demo` refresh RUN/report.html): replaces only a page meraser wrote."""
    return make_report(run_dirs, out, title=title, show_secrets=show_secrets, overwrite=True).page


def render_bench(runs: list[dict], cells: list[dict], title: str, show_secrets: bool = False,
                 timing: str = "") -> str:
    boards = "".join(_figure("leaderboard: FSR against utility" if name == "paper" else
                             f"leaderboard: {title} against utility", png, "") for name, title, png in
                     leaderboard_pngs(runs)) or "<p>No finished cell has both an FSR and a utility measure yet.</p>"
    ablations = "".join(f"<h2>FSR against {html.escape(key)}</h2>{_figure(f'FSR against {key}', png, '')}"
                        for key, png in ablation_pngs(runs))
    page = render(runs, title, show_secrets)
    head, rows = strongest_rows(runs)
    strongest = f"<h3>The strongest attack on each fingerprint</h3>{html_table(head, rows)}" if rows else ""
    strongest += (f"<h3>Which fingerprint survives which attack</h3><p>The verifications that still show ownership "
                  f"after each attack; none: every one that ran says not owned.</p>"
                  f"{html_table(*survival_rows(runs))}")
    extra = (f"<h2>Attacks: every cell of the matrix</h2><p>{html.escape(timing)}</p>"
             f"{html_table(*attack_rows(runs, cells))}"
             f"<h2>Leaderboard: fingerprint survival against utility</h2><p>One figure per verification: what it "
             f"still shows after each attack; the strongest attack on each fingerprint is ringed: of the cells "
             f"keeping at least {WIN_UTILITY:.0%} of the fingerprinted model's utility, the one the verification "
             f"scores lowest.</p>{boards}{strongest}{ablations}")
    return page.replace("<h2>Table 1</h2>", extra + "<h2>Table 1</h2>", 1)


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
    benches = [is_bench(p) for p in paths]
    if any(benches) and not all(benches):
        raise MeraserError("give run folders or bench folders, not both: a bench's cells are runs of their own")
    if all(benches):  # several benches read as one matrix (e.g. the schemes of several matrices side by side)
        loaded = [load_bench(p) for p in paths]
        runs, cells = [r for rs, _ in loaded for r in rs], [c for _, cs in loaded for c in cs]
        timing = "; ".join(bench_time(p, *b) for p, b in zip(paths, loaded))
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
