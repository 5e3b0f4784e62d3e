"""The report's tables, as (head, rows) once, drawn as HTML, in the terminal (rich) and as Markdown: Table 1, the
strict checks, accuracy per task, a bench's attack table, and which verification still shows ownership."""

from __future__ import annotations

import html

from meraser.evaluation.evaluate import ppl_text
from meraser.evaluation.ownership import p_text
from meraser.evaluation.strict import CHECKS
from meraser.evaluation.verifications import verdict_text
from meraser.report.data import STAGES, WIN_UTILITY, final_stage, last_row, run_label, strongest, task_accs, utility


def tasks_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Downstream accuracy per task at every stage (lm-eval and BIG-bench tasks, where `eval.tasks` was set)."""
    head = ["run", "task"] + list(STAGES)
    rows = []
    for run in runs:
        accs = {s: task_accs(run["stages"].get(s, {})) for s in STAGES}
        for t in dict.fromkeys(t for a in accs.values() for t in a):
            rows.append([run_label(run), t, *(f"{accs[s][t]:.3f}" if t in accs[s] else "" for s in STAGES)])
    return head, rows


def html_table(head: list[str], rows: list[list]) -> str:
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


def pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def table1_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """The paper's Table 1: FSR and PPL at every stage, both erasure verdicts on the final model, and what every
    measuring verification (the registry's) concludes on it."""
    stages = [s for s in STAGES if any(s in r["stages"] for r in runs)] or list(STAGES[:4])
    head = ["run", "method"] + [f"{s} {k}" for s in stages for k in ("FSR", "PPL")] + ["Alg. 1 erased",
                                                                                      "erased strictly"]
    head += [f"{v.title}, final" for v in _measuring()]
    rows = []
    for run in runs:
        st, last = run["stages"], last_row(run)
        cells = [run_label(run) if "attack" in run else run["name"], run["method"]]
        for s in stages:
            cells += [pct(st.get(s, {}).get("fsr")), ppl_text(st.get(s, {}))]
        rows.append(cells + [str(last.get("erased", "")), str(last.get("strict", {}).get("erased_strict", ""))]
                    + [verdict_text(v, last) for v in _measuring()])
    return head, rows


def _measuring() -> list:
    """The registered verifications with no column of their own yet: Table 1 and the attack table show each."""
    from meraser.evaluation.verifications import REGISTRY

    return [v for v in REGISTRY.values() if v.column]


def strict_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
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
            rows.append([run_label(run), stage, *(pct(strict.get(k)) for k in CHECKS if k != "loglik"),
                         "" if strict.get("loglik") is None else f"{strict['loglik']:.2f}", verdict])
    return head, rows


def table1_html(runs: list[dict]) -> str:
    return html_table(*table1_rows(runs))


def attack_rows(runs: list[dict], cells: list[dict]) -> tuple[list[str], list[list]]:
    """Every cell of the matrix (done, failed or missing) with the attack's effect and cost."""
    head = ["fingerprint", "attack", "settings", "status", "FSR before", "FSR after", "erased strictly",
            "ownership p-value", "PPL before", "PPL after", "ordinary acc. after", "utility", "wall time", "peak memory"]
    head += [f"{v.title} after" for v in _measuring()]
    by_id = {r["name"]: r for r in runs}
    rows = []
    for c in cells or [{"id": r["name"], "fingerprint": r["method"], "attack": r["attack"], "grid": r["grid"],
                        "status": "done"} for r in runs]:
        r = by_id.get(c["id"])
        st = r["stages"] if r else {}
        fp, last = st.get("fingerprinted", {}), last_row(r) if r else {}
        u = utility(r) if r else None
        status = f"{c['status']}: {(c.get('error') or '')[:80]}" if c["status"] in ("failed", "stale") else c["status"]
        settings = c.get("settings", " ".join(f"{k}={v}" for k, v in c["grid"].items()))
        rows.append([c["fingerprint"], c["attack"], settings, status,
                     pct(fp.get("fsr")), pct(last.get("fsr")), str(last.get("strict", {}).get("erased_strict", "")),
                     p_text(last['ownership']['p_value']) if "ownership" in last else "", ppl_text(fp),
                     ppl_text(last), pct(last.get("ordinary_accuracy")), "" if u is None else f"{u:.0%}",
                     f"{r['seconds']:.0f} s" if r and r.get("seconds") else "",
                     f"{r['peak_rss_mb']} MB" if r and r.get("peak_rss_mb") else ""]
                    + [verdict_text(v, last) for v in _measuring()])
    return head, rows


def verification_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Attack x verification: for every run (a bench cell), what each registered verification concludes on the
    fingerprinted model and on the final one ("owned" where it still shows ownership). Columns come from the
    registry, so a new verification needs no change here."""
    from meraser.evaluation.verifications import REGISTRY

    head = ["run", "fingerprint", "final stage"] + [f"{v.title}: fingerprinted -> final" for v in REGISTRY.values()]
    rows = []
    for run in runs:
        fp, last = run["stages"].get("fingerprinted", {}), last_row(run)
        if not fp and not last:
            continue
        rows.append([run_label(run) if "attack" in run else run["name"], run["method"], final_stage(run)]
                    + [f"{verdict_text(v, fp) or '-'} -> {verdict_text(v, last) or '-'}" for v in REGISTRY.values()])
    return head, rows


def survival_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Attack x fingerprint: which verifications still show ownership after each attack ("none" where every one
    that ran says not owned, "" where the cell was not measured). One column per fingerprint, so the schemes of
    several bench folders read side by side (`meraser report BENCH BENCH ...`)."""
    from meraser.evaluation.verifications import REGISTRY

    attacked = [r for r in runs if "attack" in r]
    methods = list(dict.fromkeys(r["method"] for r in attacked))
    cells: dict[str, dict[str, str]] = {}
    for run in attacked:
        verdicts = [(name, v.verdict(last_row(run))[1]) for name, v in REGISTRY.items()]
        owned = [name for name, o in verdicts if o]
        ran = any(o is not None for _, o in verdicts)
        cells.setdefault(run_label(run, fingerprint=False), {})[run["method"]] = \
            ", ".join(owned) if owned else ("none" if ran else "not measured")
    return ["attack"] + methods, [[attack] + [row.get(m, "") for m in methods] for attack, row in cells.items()]


def strongest_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Fingerprint x verification: the strongest attack on each fingerprint by each verification (`strongest`), what
    that verification concludes after it and the utility it keeps; the leaderboard rings the same cells."""
    from meraser.evaluation.verifications import REGISTRY

    attacked = [r for r in runs if "attack" in r]
    if not attacked:
        return [], []
    best = {name: strongest(attacked, name) for name in REGISTRY}
    head = ["fingerprint"] + [f"by the {v.title}" for v in REGISTRY.values()]
    rows = []
    for method in dict.fromkeys(r["method"] for r in attacked):
        rows.append([method] + [_strongest_cell(best[name].get(method), v, [r for r in attacked if r["method"] == method])
                                for name, v in REGISTRY.items()])
    return head, rows


def _strongest_cell(best: dict | None, v, runs: list[dict]) -> str:
    if best is not None:
        return (f"{run_label(best, fingerprint=False)} ({verdict_text(v, last_row(best)) or '-'}; "
                f"utility {utility(best):.0%})")
    if all(v.score(last_row(r)) is None for r in runs):
        return "not measured"
    return f"none keeps {WIN_UTILITY:.0%} utility"


def summary_tables(runs: list[dict], cells: list[dict] | None = None) -> list[tuple[str, list[str], list[list]]]:
    """(title, head, rows) of what `meraser report` prints and writes as Markdown: the attack table (a bench),
    Table 1, and accuracy per task where measured."""
    tables = []
    if cells is not None:  # the page's columns, paired up to fit a terminal: before -> after
        _, rows = attack_rows(runs, cells)
        head = ["fingerprint", "attack", "settings", "status", "FSR", "erased strictly", "p-value", "PPL",
                "ordinary acc.", "utility", "time"] + [v.title for v in _measuring()]
        tables.append(("attacks: every cell", head, [
            r[:4] + [f"{r[4]} -> {r[5]}" if r[5] else "", r[6], r[7], f"{r[8]} -> {r[9]}" if r[9] else "", r[10],
                     r[11], r[12]] + r[14:] for r in rows]))
        head, rows = strongest_rows(runs)
        if rows:
            tables.append(("the strongest attack on each fingerprint, by each verification", head, rows))
        tables.append(("which fingerprint survives which attack (the verifications that still show ownership)",
                       *survival_rows(runs)))
    head, rows = verification_rows(runs)
    if rows:
        tables.append(("which verification still shows ownership", head, rows))
    table1 = [r for r in runs if "erased" in r["stages"] or "recovered" in r["stages"]] if cells is not None else runs
    if table1:
        tables.append(("Table 1: FSR and PPL at every stage", *table1_rows(table1)))
    head, rows = strict_rows(table1 or runs)
    if rows:
        tables.append(("Table 1, strict: every check at every stage", head, rows))
    head, rows = tasks_rows(runs)
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
