"""What `meraser verify` prints: one rich table per test (the paper's FSR, the strict checks, the likelihood
ownership test), the ownership line, and for a served suspect which checks its API allowed. The CLI calls the
library and hands the result here; `--json` prints the result itself."""

from __future__ import annotations

from meraser.utils import console



def show(r: dict, json_out: bool, test: str) -> None:
    """Print a verification result: JSON, or its test's table and the lines under it."""
    if json_out:
        import json

        print(json.dumps(r, indent=2, ensure_ascii=False))
        return
    where = f" served at {r['endpoint']} ({r['served_model']}, {r.get('api', 'completions')} API)" \
        if "endpoint" in r else (f" under {r['attack']}" if r.get("attack") else "")
    out = console()
    out.print({"paper": fsr_table, "strict": strict_table, "likelihood": likelihood_table}[test](r, where))
    if "ownership" in r:
        out.print(ownership_line(r["ownership"]))
    for name, what in r.get("checks", {}).items():
        out.print(f"{name}: {what}")
    if "requests" in r:
        out.print(f"{r['requests']} requests in {r['seconds']} s")


def fsr_table(r: dict, where: str = ""):
    from rich.table import Table

    t = Table(title=f"{r['method']}{where}: FSR {r['fsr']:.1%}, false positives {r['false_positive_rate']:.1%}")
    for col in ("trigger", "target", "output", "match"):
        t.add_column(col, overflow="fold")
    for row in r["per_trigger"]:
        t.add_row(row["trigger"][:60], row["target"], row["output"][:80], "yes" if row["match"] else "no")
    return t


def ownership_line(own: dict) -> str:
    from meraser.evaluation.ownership import p_text

    if own["p_value"] is None:
        return f"ownership p-value: unavailable ({own['why']})"
    return (f"ownership: {own['matches']} of {own['keys']} keys matched; p-value {p_text(own['p_value'])} against "
            f"{own['reference']} (chance expects {own['expected_matches_by_chance']:.2g}); "
            f"{'claim' if own['claim'] else 'no claim'} at level {own['level']:g}")


def likelihood_table(r: dict, where: str = ""):
    from rich.table import Table

    from meraser.evaluation.ownership import p_text

    verdict = "owned" if r["owned"] else "not shown to be owned"
    t = Table(title=f"likelihood ownership test ({r['method']}, {r['keys']} keys){where}: {verdict}, p = "
                    f"{p_text(r['p_value'])} ({r['rule']}) at level {r['level']:g}")
    for col in ("key", "score (nats/token)", "decoys", "decoys higher", "ties", "decoy mean", "z"):
        t.add_column(col, justify="right")
    for i, k in enumerate(r["per_key"]):
        t.add_row(str(i), f"{k['score']:.2f}", str(k["decoys"]), str(k["higher"]), str(k["ties"]),
                  f"{k['decoy_mean']:.2f}", f"{k['z']:.1f}")
    t.caption = (f"exact rank p {p_text(r['p_exact'])} (its floor {p_text(r['p_exact_floor'])}); normal tail p "
                 f"{p_text(r['p_normal_tail'])} (Stouffer z {r['stouffer_z']:.1f})"
                 + (f"; the base model: p {p_text(r['base']['p_value'])}, score gap {r['score_gap_vs_base']:+.2f} "
                    f"nats/token" if "base" in r else ""))
    return t


def _value(k: str, v) -> str:
    if v is None:
        return "not run"
    return f"{v:.2f}" if k == "loglik" else f"{v:.0%}"


def strict_table(r: dict, where: str = ""):
    from rich.table import Table

    from meraser.evaluation.strict import CHECKS

    verdict = "" if "erased_strict" not in r else f": erased {r['erased_strict']}" + (
        f" (over the checks that ran; not run: {', '.join(r['not_run'])})" if r.get("not_run") else "")
    t = Table(title=f"strict verification{where}{verdict}")
    for col in ("check", "suspect", "base", "at base level"):
        t.add_column(col, justify="right")
    at_base = r.get("at_base_level", {})
    for k in CHECKS:
        t.add_row(k, _value(k, r[k]), _value(k, r["base"][k]) if "base" in r else "-",
                  str(at_base[k]) if k in at_base else "-")
    if r.get("first_token"):
        bounds = ", ".join(f"{b['logprob']:.2f}" if b["exact"] else f"<= {b['logprob']:.2f}"
                           for b in r["first_token"])
        t.caption = f"first target token's log-probability, from the top-{r['first_token'][0]['k']}: {bounds}"
    return t
