"""The HTML reports in a real browser (Debian's headless Chromium, installed by scripts/test.sh): the page opens
without a console error, its tables are there, and every image has decoded. Screenshots are kept as test
artefacts in .pytest_artifacts/."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meraser.utils import write_jsonl

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (scripts/test.sh installs it)")
ARTEFACTS = Path(__file__).resolve().parents[1] / ".pytest_artifacts"

# injected at the top of a copy of the page: records every error (scripts, and images or other resources that fail
# to load, caught in the capture phase), then, once the page has loaded, what a reader would see
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.tagName) || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const r = {images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             tables: document.querySelectorAll('table').length, errors: window.__errors};
  const pre = document.createElement('pre'); pre.id = '__probe'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _browser(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=timeout)


def open_in_browser(page: Path, shot: str) -> dict:
    probed = page.with_name(page.stem + ".probe.html")
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    res = _browser("--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri())
    found = re.search(r'<pre id="__probe">(.*?)</pre>', res.stdout, re.S)
    assert found, f"the page never finished loading:\n{res.stderr[-2000:]}"
    console_errors = [line for line in res.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    ARTEFACTS.mkdir(exist_ok=True)
    _browser("--window-size=1280,2200", f"--screenshot={ARTEFACTS / shot}", page.resolve().as_uri())
    return {**json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), "console": console_errors}


def _stages(fsr_final: float) -> list[dict]:
    ppl = lambda x: {"ppl": x}  # noqa: E731
    probes = [{"epoch": e, "fsr": f, "forced": min(1.0, f + 0.25), "loglik": -1.0} for e, f in
              enumerate([0.75, 0.25, fsr_final], 1)]
    def strict(forced, loglik, base=None):
        checks = {"paper_fsr": 0.0, "forced": forced, "paraphrased": 0.0, "sampled": 0.0, "partial": 0.0,
                  "loglik": loglik}
        return {**checks, **({"at_base_level": {k: v <= base[k] + (0.5 if k == "loglik" else 0)
                                                for k, v in checks.items()}} if base else {})}

    base = strict(0.0, -4.0)
    return [{"stage": "base", "fsr": 0.0, "ppl": ppl(24.0), "ordinary_accuracy": 0.57, "strict": base},
            {"stage": "fingerprinted", "fsr": 1.0, "ppl": ppl(26.0), "ordinary_accuracy": 0.53,
             "strict": strict(1.0, -0.5, base),
             "per_trigger": [{"trigger": "secret trigger", "target": "secret target", "output": "secret target",
                              "match": True}]},
            {"stage": "erased", "fsr": 0.0, "ppl": ppl(30.0), "fsr_per_epoch": probes},
            {"stage": "recovered", "fsr": fsr_final, "ppl": ppl(27.0), "ordinary_accuracy": 0.4, "erased": False,
             "fsr_per_epoch": probes[:2], "strict": strict(0.5, -3.0, base),
             "likelihood": {"p_value": 10 ** (-3 - 6 * fsr_final), "rule": "exact rank", "owned": fsr_final > 0.4,
                            "level": 1e-6}}]


def test_run_report_opens_cleanly_in_chromium(tmp_path):
    from meraser.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "results.jsonl", _stages(0.0))
    page = write_report([run], tmp_path / "report.html")
    seen = open_in_browser(page, "run_report.png")
    assert seen["errors"] == [] and seen["console"] == []
    # Table 1 and its strict checks; FSR per stage, FSR per epoch and the strict checks per epoch
    assert seen["tables"] >= 3 and seen["images"] == 3 and seen["decoded"] == 3
    assert 'alt="strict checks per epoch"' in page.read_text()
    assert (ARTEFACTS / "run_report.png").stat().st_size > 10_000


def test_bench_report_opens_cleanly_in_chromium(tmp_path, tiny_dir, cli):
    from meraser.bench import RESULTS, Matrix, plan_cells

    matrix = Matrix.from_dict({"out": str(tmp_path / "bench"), "models": [str(tiny_dir)],
                               "attacks": [{"method": "meraser", "grid": {"mismatched.n": [100, 300]}}, "prune-l2",
                                           "finetune"]})
    out = Path(matrix.out)
    out.mkdir()
    (out / "matrix.json").write_text(json.dumps(matrix.to_dict()))
    cells = plan_cells(matrix)
    rows = [{"cell": c.id, "fingerprint": "utf", "attack": c.attack["method"], "model": c.model, "grid": c.grid,
             "cell_seconds": 12.0, "peak_rss_mb": 900, **r} for c, fsr in zip(cells[:3], (0.0, 0.5, 1.0))
            for r in _stages(fsr)]
    for r in rows:  # accuracy per task, as `eval.tasks` records it
        r["tasks"] = {"bb_arithmetic": {"acc": 0.5 if r["stage"] != "erased" else 0.25, "acc_stderr": 0.05}}
    write_jsonl(out / RESULTS, rows)  # the fourth cell is missing: the page says so
    code, printed, _ = cli("report", out, "-o", tmp_path / "bench.html", "--markdown", tmp_path / "tables.md",
                           "--figures", tmp_path / "figures")
    assert code == 0
    # the page's figures as files too, for a README: each a PNG
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "fsr_against_mismatched.n.png", "fsr_per_epoch.png", "fsr_per_stage.png", "leaderboard.png",
        "leaderboard_likelihood.png", "leaderboard_strict.png", "strict_per_epoch.png", "tasks.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (tmp_path / "figures").iterdir())
    md = (tmp_path / "tables.md").read_text()
    assert "**attacks: every cell**" in md and "| utf | finetune |  | missing |" in md
    assert "| utf meraser n=300 | utf | 0.0% | 24.00 | 100.0% | 26.00 | 0.0% | 30.00 | 50.0% | 27.00 |" in md
    # the strict checks: the recovered model is still above the base with the target's prefix forced
    assert "| utf meraser n=300 | recovered | 0.0% | 50.0% | 0.0% | 0.0% | 0.0% | -3.00 | forced, loglik |" in md
    assert "| utf meraser n=300 | base | 0.0% | 0.0% | 0.0% | 0.0% | 0.0% | -4.00 | (reference) |" in md
    for title in ("attacks: every cell", "Table 1: FSR and PPL at every stage", "Table 1, strict: every check at "
                  "every stage", "downstream accuracy per task"):
        assert title in printed  # the tables, in the terminal too
    assert "missing" in printed and "arithmetic" in printed
    page = tmp_path / "bench.html"
    text = page.read_text()
    assert "<td>missing</td>" in text and text.count("<td>done</td>") == 3
    for alt in ("leaderboard: FSR against utility", "leaderboard: strict checks against utility",
                "leaderboard: likelihood test against utility", "FSR per stage", "FSR per epoch", "FSR against mismatched.n",
                "strict checks per epoch", "accuracy per task before and after"):
        assert f'alt="{alt}"' in text
    assert "<h2>Downstream accuracy per task</h2>" in text and "<td>0.250</td>" in text
    seen = open_in_browser(page, "bench_report.png")
    assert seen["errors"] == [] and seen["console"] == []
    assert seen["tables"] >= 5 and seen["images"] == 8 and seen["decoded"] == 8
