"""`meraser bench`: a matrix checked whole before any cell, fingerprints made once and shared, one results store
that a re-run completes and never duplicates, even after SIGKILLs at random points."""

import html
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from conftest import TINY, TINY_PER_METHOD, write_pool
from tiny import POOL, TINY_ERASE, TINY_RECOVER

from meraser.bench import RESULTS, load_matrix, plan_cells, run_bench
from meraser.utils import MeraserError, read_jsonl


def _matrix(tmp_path, tiny_dir, out="bench", **changes) -> dict:
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    text = tmp_path / "text.txt"  # perplexity, so every cell has a utility for the leaderboard
    text.write_text(" ".join(p.response for p in POOL[:40]))
    m = {"out": str(tmp_path / out), "models": [str(tiny_dir)],
         "fingerprints": [{"method": "utf", "config": {**TINY, **TINY_PER_METHOD["utf"]}}],
         "attacks": ["meraser", {"method": "prune-magnitude", "config": {"sparsity": 0.5}}],
         "seeds": [0],
         "experiment": {"mismatched": {"source": str(pool), "n": 40}, "clean": {"source": str(pool), "n": 40},
                        "erase": {"overrides": TINY_ERASE}, "recover": {"overrides": TINY_RECOVER},
                        "eval": {"false_positive_inputs": 4, "strict": False, "ppl": str(text), "ppl_windows": 2,
                                 "ppl_window": 32}, "probe_fsr": False}}
    m.update(changes)
    return m


def _write(tmp_path, m, name="matrix.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(m))
    return path


def _table(out: Path) -> dict:
    """(cell, stage) -> the figures a final table shows."""
    rows = read_jsonl(out / RESULTS)
    keys = [(r["cell"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    return {(r["cell"], r["stage"]): (r.get("fsr"), r.get("false_positive_rate"),
                                      r.get("ownership", {}).get("p_value"), r.get("erased")) for r in rows}


def test_matrix_runs_every_cell_once_sharing_the_fingerprint(tmp_path, tiny_dir):
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, grid={"mismatched.n": [20, 40]}))
    res = run_bench(load_matrix(path), progress=False)
    out = tmp_path / "bench"
    assert res == {"cells": 4, "done": 0, "ran": 4, "failed": [], "stale": [], "reverified": 0}  # 2 attacks x 2 grid values (the prune
    assert len(list((out / "fingerprints").iterdir())) == 1  # ignores mismatched.n, but a cell is a cell)
    rows = read_jsonl(out / RESULTS)
    stages = {}
    for r in rows:
        stages.setdefault(r["attack"], set()).add(r["stage"])
        assert r["seed"] == 0 and r["versions"]["torch"] and r["peak_rss_mb"] > 0 and r["cell_seconds"] > 0
        assert 0 < r["rss_at_start_mb"] <= r["peak_rss_mb"] + 1
    assert stages == {"meraser": {"base", "fingerprinted", "erased", "recovered"},
                      "prune-magnitude": {"base", "fingerprinted", "attacked"}}
    fingerprinted = {r["fsr"] for r in rows if r["stage"] == "fingerprinted"}
    assert fingerprinted == {1.0}  # every cell attacked the same shared fingerprinted model
    # ... and the base and fingerprinted models were evaluated once, by the first cell, for all four
    assert sorted(f.name.split("__")[0] for f in (out / "shared" / "evals").iterdir()) == ["base", "fingerprinted"]
    meta = ("cell", "attack", "grid", "settings", "cell_seconds", "peak_rss_mb", "rss_at_start_mb")
    for stage in ("base", "fingerprinted"):
        same = [{k: v for k, v in r.items() if k not in meta} for r in rows if r["stage"] == stage]
        assert len(same) == 4 and all(x == same[0] for x in same)
    assert {r["grid"]["mismatched.n"] for r in rows} == {20, 40}
    table = _table(out)

    again = run_bench(load_matrix(path), progress=False)  # a finished matrix: nothing runs, nothing is added
    assert again == {"cells": 4, "done": 4, "ran": 0, "failed": [], "stale": [], "reverified": 0} and _table(out) == table
    from test_safety import private_files_check

    card = json.loads(next((out / "fingerprints").glob("*/fingerprint_card.json")).read_text())
    secrets = [f for t in card["triggers"] + card["targets"] for f in (t, json.dumps(t)[1:-1])]
    assert private_files_check(out, secrets) == {}  # the store, each cell's rows, the report: owner-only
    dry = run_bench(load_matrix(path), dry_run=True, progress=False)
    assert dry["done"] == 4

    # the report of a partial store: one cell's rows gone, another logged as failed; nothing crashes
    from meraser.report import write_bench_report

    page = write_bench_report(out, tmp_path / "full.html").read_text()
    assert page.count("<td>done</td>") == 4 and 'alt="leaderboard: FSR against utility"' in page
    # the matrix's wall time: the cells' own, and the shared fingerprinting's, logged when it was made
    made = read_jsonl(out / "made.jsonl")
    assert [m["what"] for m in made] == ["fingerprinted model"] and made[0]["seconds"] > 0
    from meraser.report import bench_time, load_bench

    timing = bench_time(out, *load_bench(out))
    assert timing.startswith("4 of 4 cells done, ") and "of shared work" in timing and "not recorded" not in timing
    assert html.escape(timing) in page
    cells = sorted({r["cell"] for r in rows})
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows if r["cell"] != cells[0]))
    (out / "failed.jsonl").write_text(json.dumps({"cell": cells[1], "error": "RuntimeError: out of memory"}) + "\n")
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows if r["cell"] not in cells[:2]))
    page = write_bench_report(out, tmp_path / "partial.html").read_text()
    assert page.count("<td>done</td>") == 2 and "<td>missing</td>" in page and "failed: RuntimeError" in page


def test_the_bench_time_counts_the_shared_work_of_finished_cells_only(tmp_path, tiny_dir):
    """A partial store: the shared work of cells still to run (here the transfer adapter) is not made yet, so it is
    neither counted nor listed as unrecorded; the fingerprint the finished cell used is counted."""
    from meraser.bench import MADE, plan_cells, shared_root
    from meraser.bench.shared import fingerprint_folder
    from meraser.report import bench_time, load_bench
    from meraser.utils import write_json

    attacks = ["prune-magnitude", "meraser-transfer"]
    matrix = load_matrix(_write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=attacks)))
    out = Path(matrix.out)
    prune = next(c for c in plan_cells(matrix) if c.attack["method"] == "prune-magnitude")
    out.mkdir(parents=True)
    write_json(out / "matrix.json", matrix.to_dict())
    folder = fingerprint_folder(shared_root(matrix), prune).name
    made = {"what": "fingerprinted model", "folder": folder, "seconds": 150}
    (shared_root(matrix) / MADE).write_text(json.dumps(made) + "\n")
    rows = [{"cell": prune.id, "model": prune.model, "fingerprint": "utf", "attack": "prune-magnitude", "stage": s,
             "cell_seconds": 60.0} for s in ("fingerprinted", "attacked")]
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_time(out, *load_bench(out)) == ("1 of 2 cells done, 60 s of cell time (each cell's own wall time, "
                                                 "summed), plus 2 min of shared work (fingerprinted models, transfer "
                                                 "adapter, merge experts)")


def test_only_runs_the_named_cells_and_a_rerun_adds_the_rest(tmp_path, tiny_dir, monkeypatch):
    from meraser.bench import execute

    shown, real = [], execute.progress_bar

    def recording_bar(enabled=True, transient=False):  # what the bench's bar says, as it says it
        bar = real(False)
        update = bar.update
        bar.update = lambda task, **kw: (shown.append(kw["description"]) if "description" in kw else None,
                                         update(task, **kw))
        return bar

    monkeypatch.setattr(execute, "progress_bar", recording_bar)
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir))
    with pytest.raises(MeraserError, match="--only prune-magnitud3: no cell id contains it"):
        run_bench(load_matrix(path), only=["prune-magnitud3"], progress=False)
    res = run_bench(load_matrix(path), only=["prune-magnitude"], progress=False)
    assert res == {"cells": 2, "done": 0, "ran": 1, "failed": [], "stale": [], "reverified": 0}
    assert {r["attack"] for r in read_jsonl(tmp_path / "bench" / RESULTS)} == {"prune-magnitude"}
    listed = io.StringIO()  # --dry-run --only lists the picked cells alone, by the id --only matches
    cells = plan_cells(load_matrix(path))
    run_bench(load_matrix(path), dry_run=True, only=["meraser"], progress=False,
              console=Console(file=listed, width=200))
    ids = {c.attack["method"]: c.hash for c in cells}
    assert "1 of 2 cells, 1 done (--only)" in listed.getvalue() and ids["meraser"] in listed.getvalue()
    assert ids["prune-magnitude"] not in listed.getvalue()
    shown.clear()
    log = io.StringIO()  # output that is no terminal (nohup, a CI log) sees no bar: it gets a line per stage
    assert run_bench(load_matrix(path), progress=False, console=Console(file=log, width=200))["ran"] == 1  # the
    # meraser cell, the prune one kept
    assert {r["attack"] for r in read_jsonl(tmp_path / "bench" / RESULTS)} == {"prune-magnitude", "meraser"}
    # a cell runs for minutes to hours: the bar names the stage it is in, not the cell alone
    cell = next(d for d in shown if " · " not in d)
    assert cell.startswith("matrix: ") and " x meraser" in cell
    assert [d.split(" · ")[1] for d in shown if " · " in d] == [
        "eval:base", "eval:fingerprinted", "mismatched", "clean", "erased", "eval:erased", "recovered",
        "eval:recovered"]
    assert all(f"{d}\n" in log.getvalue() for d in shown if " · " in d)
    # the fingerprint limited to the prune afterwards (`attacks:` beside it): nothing runs, the store's matrix record
    # and the report follow the edit, and the meraser cell, no longer planned, is not shown as missing
    from meraser.report.data import load_bench

    m = _matrix(tmp_path, tiny_dir)
    m["fingerprints"][0]["attacks"] = [m["attacks"][1]]
    res = run_bench(load_matrix(_write(tmp_path, m)), progress=False)
    assert (res["cells"], res["done"], res["ran"]) == (1, 1, 0)
    assert [(c["attack"], c["status"]) for c in load_bench(tmp_path / "bench")[1]] == [("prune-magnitude", "done")]


def test_two_matrices_with_one_shared_folder_share_the_fingerprint_and_evaluations(tmp_path, tiny_dir):
    prune = [{"method": "prune-magnitude", "config": {"sparsity": 0.5}}]
    share = tmp_path / "common"
    first = _write(tmp_path, _matrix(tmp_path, tiny_dir, out="a", shared=str(share), attacks=prune), "a.yaml")
    second = _write(tmp_path, _matrix(tmp_path, tiny_dir, out="b", shared=str(share),
                                      attacks=[{**prune[0], "config": {"sparsity": 0.3}}]), "b.yaml")
    assert run_bench(load_matrix(first), progress=False)["ran"] == 1
    made = {p: p.stat().st_mtime_ns for p in share.rglob("*") if p.is_file() and p.name != ".lock"}  # the lock
    # file names its holder, so each run writes it
    assert run_bench(load_matrix(second), progress=False)["ran"] == 1
    assert not (tmp_path / "b" / "fingerprints").exists() and not (tmp_path / "b" / "shared").exists()
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nothing in the shared folder made again
    assert len(list((share / "fingerprints").iterdir())) == 1 and len(list((share / "shared" / "evals").iterdir())) == 2
    a, b = (read_jsonl(tmp_path / o / RESULTS) for o in "ab")
    for stage in ("base", "fingerprinted"):
        ra, rb = ([{k: v for k, v in r.items() if k in ("fsr", "ppl", "strict", "per_trigger")}
                   for r in rows if r["stage"] == stage] for rows in (a, b))
        assert ra == rb and ra[0]["fsr"] is not None
    # the two read as one matrix: one report, each attack a row of the survival table
    from meraser.report import make_report
    from meraser.report.tables import survival_rows

    rep = make_report([tmp_path / "a", tmp_path / "b"], tmp_path / "both.html")
    head, rows = survival_rows(rep.runs)
    assert len(head) == 2 and sorted(r[0] for r in rows) == ["prune-magnitude sparsity=0.3",
                                                             "prune-magnitude sparsity=0.5"]
    assert all(r[1] and r[1] != "not measured" for r in rows)  # measured: the verifications owned, or "none"
    assert "Which fingerprint survives which attack" in rep.page.read_text() and rep.timing.count("cells done") == 2
    with pytest.raises(MeraserError, match="not both"):
        make_report([tmp_path / "a", next((tmp_path / "a" / "cells").iterdir())], tmp_path / "mixed.html")


def test_cells_that_differ_only_in_recovery_share_one_erase(tmp_path, tiny_dir):
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=[{"method": "meraser", "grid": {"clean.n": [20, 40]}}]))
    assert run_bench(load_matrix(path), progress=False)["ran"] == 2
    out = tmp_path / "bench"
    assert len(list((out / "shared" / "erased").iterdir())) == 1  # made by the first cell, copied by the second
    assert len(list((out / "shared" / "recovered").iterdir())) == 2
    logs = [(c / "erased" / "train_log.json").read_text() for c in (out / "cells").iterdir()]
    assert len(logs) == 2 and logs[0] == logs[1]
    erased = [r for r in read_jsonl(out / RESULTS) if r["stage"] == "erased"]
    assert erased[0]["fsr"] == erased[1]["fsr"] and erased[0]["ppl"] == erased[1]["ppl"]


def test_a_cell_that_copies_shared_stages_loads_through_its_own_folders(tmp_path, tiny_dir):
    """Cells that differ only in evaluation share erase and recovery; each copy must apply to its own cell's erased
    model, not to the folder of the cell that made it: removing that cell leaves the other whole."""
    import shutil

    from meraser.models import adapter_base, load_model

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=[{"method": "meraser",
                                                                  "grid": {"eval.false_positive_inputs": [0, 2]}}]))
    assert run_bench(load_matrix(path), progress=False)["ran"] == 2
    out = tmp_path / "bench"
    assert len(list((out / "shared" / "recovered").iterdir())) == 1  # made by one cell, copied by the other
    cells = sorted((out / "cells").iterdir())
    for c in cells:
        assert Path(adapter_base(str(c / "recovered"))) == (c / "erased").resolve()
    for c in cells:  # whichever cell made the stages, the other loads without it
        keep = tmp_path / "keep"
        shutil.copytree(c, keep)
        shutil.rmtree(c)
        other = next(x for x in cells if x != c)
        load_model(str(other / "recovered"))
        shutil.move(str(keep), str(c))


BAD = [
    ({"attacks": ["prune-magnitud"]}, "matrix.yaml: attacks[0].method: unknown attack 'prune-magnitud'; "
                                      "did you mean 'prune-magnitude'?"),
    ({"grid": {"mismatched.nn": [1, 2]}}, "mismatched: unknown key 'nn'; did you mean 'n'?"),
    ({"fingerprints": [{"method": "utff"}]}, "matrix.yaml: fingerprints[0].method: unknown fingerprint method "
                                            "'utff'; did you mean 'utf'?"),
    ({"models": ["smollm2-13m"]}, "matrix.yaml: models[0]: model 'smollm2-13m' is not a folder, an alias or a model "
                                  "in the local Hugging Face cache (offline); did you mean 'smollm2-135m'?"),
    ({"models": ["./no/such/model"]}, "models[0]: model folder './no/such/model' does not exist"),
    ({"seeds": []}, "matrix.yaml: seeds: give at least one"),
    ({"attack": ["meraser"]}, "matrix.yaml: unknown key 'attack'; did you mean 'attacks'?"),
]


@pytest.mark.parametrize("changes,fragment", BAD, ids=[f for _, f in BAD])
def test_bad_matrix_is_refused_before_any_cell(tmp_path, tiny_dir, changes, fragment):
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, **changes))
    with pytest.raises(MeraserError) as e:
        run_bench(load_matrix(path), where=f"{path.name}: ", progress=False)
    assert fragment in str(e.value)
    assert not (tmp_path / "bench").exists()  # nothing was written


def _run_then_kill(cmd, env, ready, delay: float) -> bool:
    """Start `meraser bench`, wait until `ready()` (a point in its work), then `delay` seconds; SIGKILL it if it is
    still running. True when it was killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_table(tmp_path, tiny_dir):
    """SIGKILLs at random moments of `meraser bench` (while the shared fingerprint is made, inside the first cell,
    inside the second), then a run to the end: the same final table as an uninterrupted run with the same seeds,
    and no row twice."""
    reference = _write(tmp_path, _matrix(tmp_path, tiny_dir, out="straight"), "straight.yaml")
    run_bench(load_matrix(reference), progress=False)
    killed = _write(tmp_path, _matrix(tmp_path, tiny_dir, out="killed"), "killed.yaml")
    out = tmp_path / "killed"
    cmd = [str(Path(sys.executable).with_name("meraser")), "bench", str(killed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(7)
    points = [lambda: (out / "fingerprints").exists(),  # the shared fingerprint is being made
              lambda: any((out / "cells").glob("*/stages.json")),  # a cell has begun
              lambda: (out / RESULTS).exists()]  # the first cell is in the store; the second runs
    kills = sum(_run_then_kill(cmd, env, ready, rng.uniform(0, 1.0)) for ready in points)
    assert kills >= 2, "the runs finished before their kill points: nothing was interrupted"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert _table(out) == _table(tmp_path / "straight")


def test_two_benches_on_one_folder_one_runs_the_other_is_refused(tmp_path, tiny_dir):
    """Started 0.5 s apart on one folder: one holds the lock and finishes, the other is refused at once in one line
    naming the holder; no row is written twice, and a later run finds every cell done."""
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, out="both"))
    cmd = [str(Path(sys.executable).with_name("meraser")), "bench", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another meraser process (pid" in refused and "Traceback" not in refused
    table = _table(tmp_path / "both")  # asserts no (cell, stage) twice
    assert len({cell for cell, _ in table}) == 2
    assert run_bench(load_matrix(path), progress=False)["ran"] == 0


def test_ray_executor_gives_the_sequential_results(tmp_path, tiny_dir):
    """Two cells as Ray tasks on a local two-worker instance: the same table as one after another."""
    pytest.importorskip("ray")
    import ray

    from meraser.bench import Executor

    for out in ("seq", "ray"):
        _write(tmp_path, _matrix(tmp_path, tiny_dir, out=out), f"{out}.yaml")
    run_bench(load_matrix(tmp_path / "seq.yaml"), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        res = run_bench(load_matrix(tmp_path / "ray.yaml"), progress=False, executor=Executor("ray"))
    finally:
        ray.shutdown()
    assert res == {"cells": 2, "done": 0, "ran": 2, "failed": [], "stale": [], "reverified": 0}
    seq, par = _table(tmp_path / "seq"), _table(tmp_path / "ray")
    assert seq.keys() == par.keys()
    for key in seq:  # FSR, false positives and the verdict exactly; the p-value up to float rounding
        assert seq[key][0:2] == par[key][0:2] and seq[key][3] == par[key][3]
        assert seq[key][2] == pytest.approx(par[key][2], rel=1e-3)


def test_executor_is_checked():
    from meraser.bench import Executor

    with pytest.raises(MeraserError, match="unknown executor 'rey'; did you mean 'ray'"):
        Executor("rey").check()


def test_checked_in_smollm2_matrix_plans(tmp_path):
    """benchmarks/matrix_smollm2.yaml is a valid matrix: the paper's ablation and the merge weights as grids."""
    from meraser.bench import plan_cells

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix_smollm2.yaml"
    cells = plan_cells(load_matrix(path), where=f"{path.name}: ")
    per_attack = {}
    for c in cells:
        per_attack.setdefault(c.attack["method"], []).append(c)
    # MEraser (ablation, default recovery, strong, cycles), transfer, finetune, prunes, merges, CleanGen and Token
    # Forcing, the adaptive suite, find-and-unlearn (two ways of distilling, with two kinds of noise prompts, and
    # re-expanded after them, with the log-probabilities pulled to the base's), GRI, and the perplexity filter again
    # with its threshold set on benign prompts
    assert len(cells) == 3 * (4 + 1 + 1 + 1 + 1 + 6 + 3 + 3 + 1 + 2 + 6 + 6 + 2 + 1)
    assert sorted(str(c.experiment["attack"].get("config", {}).get("benign_refusal"))
                  for c in per_attack["perplexity-filter"]) == ["0.05"] * 3 + ["None"] * 3
    assert sorted(tuple(str(c.experiment["attack"].get("config", {}).get(k, "-")).lower()
                        for k in ("distill", "noise_from", "reexpand", "match_base"))
                  for c in per_attack["find-and-unlearn"]) == \
        [("-", "-", "-", "-")] * 3 + [("positions", "-", "-", "-")] * 6 + \
        [("positions", "undertrained", "-", "-")] * 3 + [("positions", "undertrained", "true", "-")] * 3 + \
        [("positions", "undertrained", "true", "true")] * 3
    from meraser.erase.datasets import MismatchedSet

    assert sorted(c.experiment["mismatched"].get("n", MismatchedSet().n) for c in per_attack["meraser"]) == \
        [100] * 3 + [200] * 3 + [300] * 9  # the ablation; the default recovery and `strong` at the paper's size
    # the paper's recovery data (the source's rows only), and beside it meraser's default half-Magpie recovery
    assert sorted(c.experiment["clean"]["magpie"] for c in per_attack["meraser"]) == [0.0] * 12 + [0.5] * 3
    assert [c.experiment["attack"]["config"]["clean"]["magpie"] for c in per_attack["meraser-cycles"]] == [0.0] * 3
    assert sorted(c.experiment["attack"]["config"]["weights"][0] for c in per_attack["merge-dare"]) == \
        [0.4] * 3 + [0.5] * 3 + [0.6] * 3
    assert len({c.id for c in cells}) == len(cells)


def test_checked_in_fingerprints3_matrix_plans_every_attack_of_the_smollm2_matrix():
    """benchmarks/matrix_fingerprints3.yaml: the five new schemes against the SmolLM2 matrix's attacks (MEraser at the
    paper's setting and meraser's default instead of the mismatched-set ablation), sharing its folder."""
    from meraser.bench import plan_cells, shared_root

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    smollm2, new = load_matrix(bench / "matrix_smollm2.yaml"), load_matrix(bench / "matrix_fingerprints3.yaml")
    cells = plan_cells(new)
    assert shared_root(new) == shared_root(smollm2) and len({c.id for c in cells}) == len(cells) == 5 * 31
    assert {c.fingerprint["method"] for c in cells} == {"imf", "semcond-watermark", "proflingo", "rofl", "mergeprint"}
    assert {c.attack["method"] for c in cells} == {c.attack["method"] for c in plan_cells(smollm2)}


def test_checked_in_families_matrix_plans_both_models_with_a_transfer_adapter_each():
    """benchmarks/matrix_families.yaml: four fingerprints x (MEraser, its transfer adapter) on SmolLM2 and Gemma 3;
    each family's transfer adapter is made on its own base model."""
    from meraser.bench import plan_cells, shared_parts, shared_root

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    cells = plan_cells(load_matrix(bench / "matrix_families.yaml"))
    assert len(cells) == 2 * 4 * 2 and {c.model for c in cells} == {"smollm2-135m", "gemma3-270m"}
    adapters = {c.model: shared_parts(Path("share"), c)[1] for c in cells if c.attack["method"] == "meraser-transfer"}
    assert len(set(adapters.values())) == 2 and all(m in str(f) for m, f in adapters.items())
    # Gemma's longer UTF planting shares that folder: its cells use the very transfer adapter made for Gemma above
    utf = load_matrix(bench / "matrix_families_gemma_utf.yaml")
    assert shared_root(utf) == shared_root(load_matrix(bench / "matrix_families.yaml"))
    longer = plan_cells(utf)
    assert [(c.fingerprint["method"], c.fingerprint["config"]["epochs"]) for c in longer] == [("utf", 4)] * 2
    assert {c.attack["method"] for c in longer} == {c.attack["method"] for c in cells}
    assert [shared_parts(Path("share"), c)[1] for c in longer if c.attack["method"] == "meraser-transfer"] == [
        adapters["gemma3-270m"]]


def test_checked_in_erasure_and_perinucleus_matrices_plan(tmp_path, monkeypatch):
    """benchmarks/matrix_erasure.yaml: four fingerprints x six blind recipes that share one erase per fingerprint;
    benchmarks/matrix_perinucleus.yaml plans once its fingerprinted model exists (a stand-in folder here)."""
    from meraser.bench import describe, plan_cells
    from meraser.runner import plan_experiment, Experiment

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    cells = plan_cells(load_matrix(bench / "matrix_erasure.yaml"))
    assert len(cells) == 4 * 6 and len({c.id for c in cells}) == 24
    mlp = "recover.overrides.lora.target_modules=['gate_proj', 'up_proj', 'down_proj']"
    assert {describe(c) for c in cells} == {
        "clean.magpie=0.0", "clean.magpie=0.0 clean.replay_mismatched=150", f"clean.magpie=0.0 {mlp}",
        f"clean.magpie=0.0 clean.replay_mismatched=150 {mlp}", "clean.magpie=1.0", "clean.magpie=0.5"}
    per_fp = {}
    for c in cells:  # the erase stage's identity is the same for every recipe on one fingerprint
        exp = Experiment.from_dict({**c.experiment, "model": c.model, "fingerprint": c.fingerprint,
                                    "out": str(tmp_path / c.id)})
        per_fp.setdefault(c.fingerprint["method"], set()).add(plan_experiment(exp).stages["erased"].id)
    assert all(len(ids) == 1 for ids in per_fp.values()) and len(per_fp) == 4
    # the erase-side search: four erases per fingerprint, each unlike the paper's, on the same fingerprinted models
    from meraser.bench import shared_root

    search = load_matrix(bench / "matrix_erasure_search.yaml")
    assert shared_root(search) == shared_root(load_matrix(bench / "matrix_erasure.yaml"))
    erases = {}
    for c in plan_cells(search):
        exp = Experiment.from_dict({**c.experiment, "model": c.model, "fingerprint": c.fingerprint,
                                    "out": str(tmp_path / c.id)})
        erases.setdefault(c.fingerprint["method"], set()).add(plan_experiment(exp).stages["erased"].id)
    # (the recoveries after the lr 3e-3 erase, and the `strong` preset, reuse that erase: still four new ones)
    assert {k: len(v | per_fp[k]) for k, v in erases.items()} == {m: 5 for m in ("if-sft", "subject-sentence",
                                                                                  "utf", "chain-hash")}

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/perinucleus-n/n256").mkdir(parents=True)
    cells = plan_cells(load_matrix(bench / "matrix_perinucleus.yaml"))
    assert len(cells) == 20 and cells[0].attack["method"] == "meraser" and cells[-1].attack["method"] == \
        "find-and-unlearn"
    assert {c.fingerprint["existing"] for c in cells} == {"runs/perinucleus-n/n256"}
    # merge weights set in the config (5:5) and by the grid (4:6, 6:4) read alike in tables
    assert {describe(c) for c in cells if c.attack["method"] == "merge-dare"} == {
        "weights=[0.5, 0.5]", "weights=[0.4, 0.6]", "weights=[0.6, 0.4]"}


def test_merge_cells_share_one_expert(tmp_path, tiny_dir):
    pool = str(tmp_path / "pool.jsonl")
    merge = {"method": "merge-task-arithmetic",
             "config": {"expert_data": pool, "expert_rows": 16,
                        "expert_train": {"epochs": 1, "batch_size": 8, "save_steps": -1}},
             "grid": {"attack.config.weights": [[1.0, 0.0], [0.5, 0.5]]}}
    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=[merge]))
    res = run_bench(load_matrix(path), progress=False)
    assert res == {"cells": 2, "done": 0, "ran": 2, "failed": [], "stale": [], "reverified": 0}
    shared = [f for f in (tmp_path / "bench" / "shared").iterdir() if f.name != "evals"]
    assert len(shared) == 1 and shared[0].name.startswith("expert__")
    rows = read_jsonl(tmp_path / "bench" / RESULTS)
    attacked = {tuple(r["grid"]["attack.config.weights"]): r for r in rows if r["stage"] == "attacked"}
    assert attacked[(1.0, 0.0)]["fsr"] == 1.0  # weight 1 on the fingerprinted model changes nothing
    assert all(r["settings"]["attack"]["config"]["expert"] == str(shared[0]) for r in attacked.values())


def test_report_names_an_existing_fingerprint_by_its_cards_method(tmp_path):
    from meraser.report import fingerprint_name

    folder = tmp_path / "n256"
    folder.mkdir()
    assert fingerprint_name({"existing": str(folder)}) == "n256"  # no card: the folder's name
    (folder / "fingerprint_card.json").write_text(json.dumps({"method": "perinucleus"}))
    assert fingerprint_name({"existing": str(folder)}) == "perinucleus (n256)"
    assert fingerprint_name({"method": "utf", "existing": None}) == "utf"


def test_report_keeps_two_plantings_of_one_method_apart(tmp_path):
    """benchmarks/matrix_likelihood_goal.yaml plants subject-sentence twice (one subject; a subject per key): the
    report's columns and rows name each with its settings, where both were once one "subject-sentence"."""
    from meraser.bench import Matrix, plan_cells
    from meraser.report import fingerprint_name

    plain, per_key = {"method": "subject-sentence"}, {"method": "subject-sentence",
                                                      "config": {"subjects": "per-key", "decoy_rows": 64}}
    assert fingerprint_name(plain) == "subject-sentence"
    assert fingerprint_name(per_key) == "subject-sentence (subjects=per-key decoy_rows=64)"
    matrix = Matrix.from_dict({"out": str(tmp_path / "b"), "models": ["m"], "fingerprints": [plain, per_key],
                               "attacks": ["finetune"]})
    assert len({fingerprint_name(c.fingerprint) for c in plan_cells(matrix)}) == 2


def test_a_matrix_over_two_models_keeps_their_fingerprints_apart_in_the_report(tmp_path):
    """benchmarks/matrix_families.yaml plants the same key in SmolLM2 and Gemma: its report names each fingerprint
    with its model, so Table 1, the survival table and the strongest attack show one column or row per family."""
    from meraser.bench import plan_cells
    from meraser.report import load_bench
    from meraser.report.tables import strongest_rows, survival_rows

    matrix = load_matrix(Path(__file__).resolve().parents[1] / "benchmarks" / "matrix_families.yaml")
    (tmp_path / "matrix.json").write_text(json.dumps(matrix.to_dict()))
    cells = [c for c in plan_cells(matrix) if c.fingerprint["method"] == "utf" and c.attack["method"] == "meraser"]
    rows = [{"cell": c.id, "model": c.model, "fingerprint": "utf", "attack": "meraser", "stage": stage,
             "fsr": fsr, "ppl": {"ppl": 20.0}} for c, fsr in zip(cells, (0.0, 1.0))
            for stage in ("fingerprinted", "attacked")]
    (tmp_path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs, planned = load_bench(tmp_path)
    assert sorted(r["method"] for r in runs) == ["gemma3-270m utf", "smollm2-135m utf"]
    assert {c["fingerprint"] for c in planned} >= {r["method"] for r in runs}
    head, table = survival_rows(runs)
    assert sorted(head[1:]) == sorted(r["method"] for r in runs) and len(table) == 1
    head, table = strongest_rows(runs)
    assert sorted(row[0] for row in table) == sorted(r["method"] for r in runs)


def test_leaderboard_utility_weighs_perplexity_ordinary_answers_and_tasks():
    from meraser.report import utility

    def row(ppl, ordinary, acc):
        return {"ppl": {"ppl": ppl}, "ordinary_accuracy": ordinary,
                "tasks": {"bb_a": {"acc": acc}, "bb_b": {"acc": acc}}}

    run = {"stages": {"fingerprinted": row(20.0, 0.5, 0.6), "attacked": row(40.0, 0.25, 0.3)}}
    assert utility(run) == pytest.approx(0.5)  # every measure halved
    run["stages"]["attacked"]["tasks"] = {"bb_a": {"acc": 0.6}}  # one task left: compared on that task alone
    assert utility(run) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    del run["stages"]["attacked"]["tasks"], run["stages"]["attacked"]["ordinary_accuracy"]
    assert utility(run) == pytest.approx(0.5)  # perplexity alone


def test_the_leaderboard_draws_more_fingerprints_than_it_has_marker_shapes():
    """Reports over several stores hold ten schemes and more; each still gets a marker (it raised KeyError)."""
    from meraser.report.figures import leaderboard_png

    runs = [{"name": f"fp{i}-prune", "method": f"fp{i}", "attack": "prune", "settings": "",
             "stages": {"fingerprinted": {"fsr": 1.0, "ppl": {"ppl": 10.0}},
                        "attacked": {"fsr": i / 20, "ppl": {"ppl": 11.0}}}} for i in range(15)]
    png = leaderboard_png(runs)
    assert png and len(png) > 1000


def test_the_strongest_attack_is_the_lowest_score_that_keeps_the_models_utility():
    """Per fingerprint and verification: a cell that breaks the model never wins, however low its score; among the
    others the lowest score wins, ties to the higher utility; a fingerprint whose every cell breaks has none."""
    from meraser.report.data import strongest
    from meraser.report.tables import strongest_rows

    def cell(method, attack, fsr, ppl):
        return {"name": f"{method}-{attack}", "method": method, "attack": attack, "settings": "",
                "stages": {"fingerprinted": {"fsr": 1.0, "ppl": {"ppl": 10.0}},
                           "attacked": {"fsr": fsr, "ppl": {"ppl": ppl}}}}

    runs = [cell("utf", "prune", 0.0, 100.0),      # FSR 0, utility 10%: broken
            cell("utf", "finetune", 0.5, 10.5),    # utility 95%
            cell("utf", "merge", 0.5, 10.0),       # same FSR, utility 100%: the strongest
            cell("if-sft", "prune", 0.0, 20.0)]    # utility 50% only
    best = strongest(runs, "paper")
    assert best["utf"]["attack"] == "merge" and "if-sft" not in best
    head, rows = strongest_rows(runs)
    assert head[:2] == ["fingerprint", "by the paper FSR"]
    assert rows[0][0] == "utf" and rows[0][1].startswith("merge (FSR 50%") and "utility 100%" in rows[0][1]
    assert rows[1][1] == "none keeps 90% utility"
    assert rows[0][head.index("by the likelihood test")] == "not measured"  # no cell has a likelihood result


def test_a_shared_fingerprint_made_under_other_defaults_is_refused(tmp_path, tiny_dir):
    """The shared folder is named by the matrix's fingerprint settings; if a default under them has changed since
    it was made, the bench says so instead of attacking an old fingerprint under the new settings' name."""
    from meraser.bench import fingerprint_folder, plan_cells, prepare_shared, shared_root
    from meraser.fingerprints import get_method

    matrix = load_matrix(_write(tmp_path, _matrix(tmp_path, tiny_dir)))
    cell = plan_cells(matrix)[0]
    folder = fingerprint_folder(shared_root(matrix), cell)
    folder.mkdir(parents=True)
    made = get_method("utf").Config.from_dict(cell.fingerprint["config"]).to_dict()
    (folder / "fingerprint_summary.json").write_text(json.dumps({"config": made}))
    prepare_shared([cell], shared_root(matrix))  # the same settings: reused, nothing made
    assert sorted(p.name for p in folder.iterdir()) == ["fingerprint_summary.json"]
    older = {k: v for k, v in made.items() if k != "seed"}  # made before a field existed: it had today's default
    (folder / "fingerprint_summary.json").write_text(json.dumps({"config": older}))
    prepare_shared([cell], shared_root(matrix))
    (folder / "fingerprint_summary.json").write_text(json.dumps({"config": {**made, "epochs": made["epochs"] + 1}}))
    with pytest.raises(MeraserError, match=r"made with other settings \(epochs: .*a default has changed"):
        prepare_shared([cell], shared_root(matrix))


def test_the_shared_transfer_adapter_resumes_an_interrupted_training(tmp_path, tiny_dir, monkeypatch):
    """A bench killed while it trained the shared transfer adapter left checkpoints beside it; the next run must
    continue that training (it stopped with 'holds checkpoints of an interrupted run' before)."""
    from meraser.bench import plan_cells, prepare_shared, shared_root
    from meraser.erase import transfer

    calls = []
    monkeypatch.setattr(transfer, "transfer_train", lambda base, out, **kw: calls.append((base, out, kw)))
    matrix = load_matrix(_write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=["meraser-transfer"])))
    prepare_shared(plan_cells(matrix), shared_root(matrix), progress=True)  # fingerprints, then the adapter
    assert len(calls) == 1 and calls[0][2]["resume"] == "auto"  # resume where there is something, without a note
    assert calls[0][2]["progress"] is True  # minutes of training on a real model: its bar shows (the bench's)


def test_a_cell_finished_under_other_defaults_is_stale_and_redone_only_when_asked(tmp_path, tiny_dir):
    """A cell's id hashes the matrix as written, so a default changed since leaves it alone: the bench plans every
    finished cell again, compares its stages with what its folder recorded, and refuses to call a stale cell done
    (its rows would be figures for settings the matrix no longer means) until --redo-stale runs it again."""
    from meraser.bench import fingerprint_folder, plan_cells, shared_root

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=[{"method": "prune-magnitude",
                                                                  "config": {"sparsity": 0.5}}]))
    out = tmp_path / "bench"
    assert run_bench(load_matrix(path), progress=False)["ran"] == 1
    assert run_bench(load_matrix(path), dry_run=True, progress=False)["stale"] == []
    (cell,) = plan_cells(load_matrix(path))
    record = out / "cells" / cell.id / "stages.json"
    stages = json.loads(record.read_text())
    stages["attacked"] = {"id": "made-by-an-older-meraser",
                          "settings": {**stages["attacked"]["settings"], "attack.config.sparsity": 0.4}}
    record.write_text(json.dumps(stages))

    dry = run_bench(load_matrix(path), dry_run=True, progress=False)
    assert dry["stale"] == [cell.id] and dry["done"] == 1
    from meraser.report import write_bench_report  # the report shows its figures, flagged, with what changed

    page = write_bench_report(out, tmp_path / "stale.html").read_text()
    assert "<td>stale: stage &#x27;attacked&#x27;: attack.config.sparsity: 0.4 -&gt; 0.5</td>" in page
    with pytest.raises(MeraserError, match=r"1 finished cell\(s\) were made under other settings .*stage 'attacked': "
                                           r"attack.config.sparsity: 0.4 -> 0.5.*--redo-stale"):
        run_bench(load_matrix(path), progress=False)
    res = run_bench(load_matrix(path), redo_stale=True, progress=False)
    assert res == {"cells": 1, "done": 0, "ran": 1, "failed": [], "stale": [], "reverified": 0}
    assert len({s for (_, s) in _table(out)}) == 3  # base, fingerprinted, attacked: once each, no duplicate
    assert json.loads(record.read_text())["attacked"]["id"] != "made-by-an-older-meraser"
    assert run_bench(load_matrix(path), progress=False) == {"cells": 1, "done": 1, "ran": 0, "failed": [], "stale": [],
                                                           "reverified": 0}

    summary = fingerprint_folder(shared_root(load_matrix(path)), cell) / "fingerprint_summary.json"
    made = json.loads(summary.read_text())
    summary.write_text(json.dumps({**made, "config": {**made["config"], "epochs": made["config"]["epochs"] + 1}}))
    dry = run_bench(load_matrix(path), dry_run=True, progress=False)
    assert dry["stale"] == [cell.id]
    with pytest.raises(MeraserError, match=r"its shared fingerprinted model was made with other settings \(epochs"):
        run_bench(load_matrix(path), progress=False)


def test_a_cell_finished_before_a_field_was_added_stays_done(tmp_path, tiny_dir):
    """A setting missing from a cell's record is a field meraser gained since, at its default (which keeps the old
    behaviour): the cell is not stale, and neither the bench nor the runner under it makes it again. A recorded
    setting that differs still is (the test above)."""
    from meraser.bench import plan_cells
    from meraser.runner import Experiment, plan_experiment
    from meraser.bench.shared import cell_experiment, shared_root
    from meraser.utils import settings_hash

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, attacks=[{"method": "prune-magnitude",
                                                                  "config": {"sparsity": 0.5}}]))
    out = tmp_path / "bench"
    assert run_bench(load_matrix(path), progress=False)["ran"] == 1
    (cell,) = plan_cells(load_matrix(path))
    record = out / "cells" / cell.id / "stages.json"
    stages = json.loads(record.read_text())
    for name in ("attacked", "eval:attacked"):  # as an older meraser, without the attack's 'sparsity' field, wrote it
        older = {k: v for k, v in stages[name]["settings"].items() if k != "attack.config.sparsity"}
        stages[name] = {"id": settings_hash(older), "settings": older}
    record.write_text(json.dumps(stages))
    assert run_bench(load_matrix(path), dry_run=True, progress=False)["stale"] == []
    assert run_bench(load_matrix(path), progress=False)["ran"] == 0
    plan = plan_experiment(Experiment.from_dict(cell_experiment(cell, out, shared_root(load_matrix(path)))))
    assert plan.stages["attacked"].made_by(stages["attacked"])
    changed = {**stages["attacked"]["settings"], "attack.method": "prune-random"}
    assert not plan.stages["attacked"].made_by({"id": settings_hash(changed), "settings": changed})


def test_keep_models_false_deletes_each_attacked_model_and_the_cell_still_runs_again(tmp_path, tiny_dir):
    """A 7B matrix keeps a 14 GB attacked model per cell unless told not to; without them the cells stay done, and a
    cell run again (as --redo-stale does) makes its attack again rather than load a model that is gone."""
    from meraser.bench import plan_cells, run_cell, shared_root

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, keep_models=False))
    out = tmp_path / "bench"
    assert run_bench(load_matrix(path), progress=False)["ran"] == 2
    assert not list((out / "cells").rglob("attacked")) and not list((out / "cells").rglob("model.safetensors"))
    assert list((out / "cells").rglob("adapter_model.safetensors"))  # the erase/recover adapters are kept
    prune = next(c for c in plan_cells(load_matrix(path)) if c.attack["method"] == "prune-magnitude")
    again = {r["stage"]: r["fsr"] for r in run_cell(prune, out, shared_root(load_matrix(path)))}
    stored = {r["stage"]: r["fsr"] for r in read_jsonl(out / RESULTS) if r["cell"] == prune.id}
    assert again == stored and "attacked" in again
    assert (out / "cells" / prune.id / "attacked" / "model.safetensors").is_file()


def _strip(rows: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != key} for r in rows]


def test_reverify_measures_a_verification_registered_after_the_cells_ran(tmp_path, tiny_dir):
    """A bench store made before the likelihood test existed (its rows, the cells' own and the shared evaluations
    lack it): `--reverify` measures it on the stored models (the attacked one made again where not kept), replaces
    the cells' rows with completed ones, never duplicates a row, and gives what a fresh run gives."""
    from meraser.utils import read_json, write_json, write_jsonl

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir, keep_models=False,
                                    attacks=[{"method": "prune-magnitude", "config": {"sparsity": 0.5}}]))
    out = tmp_path / "bench"
    run_bench(load_matrix(path), progress=False)
    fresh = {(r["cell"], r["stage"]): r["likelihood"]["p_value"] for r in read_jsonl(out / RESULTS)}
    assert len(fresh) == 3  # base, fingerprinted, attacked
    write_jsonl(out / RESULTS, _strip(read_jsonl(out / RESULTS), "likelihood"))
    for f in (out / "cells").glob("*/results.jsonl"):
        write_jsonl(f, _strip(read_jsonl(f), "likelihood"))
    for f in (out / "shared" / "evals").glob("*.json"):
        write_json(f, _strip([read_json(f)], "likelihood")[0])
    assert run_bench(load_matrix(path), progress=False)["reverified"] == 0  # not asked: nothing is redone
    res = run_bench(load_matrix(path), progress=False, reverify=True)
    assert res["reverified"] == 1 and res["ran"] == 0 and res["failed"] == []
    _table(out)  # no (cell, stage) row twice
    rows = read_jsonl(out / RESULTS)
    assert {(r["cell"], r["stage"]): r["likelihood"]["p_value"] for r in rows} == fresh
    assert all(r["added_later"] == ["likelihood"] for r in rows)
    assert run_bench(load_matrix(path), progress=False, reverify=True)["reverified"] == 0  # complete now


def test_reevaluate_measures_every_stage_again_on_the_stored_models_and_trains_nothing(tmp_path, tiny_dir):
    """After a fix to the evaluation, `--reevaluate` measures every stage of the finished cells again (their own
    rows, the shared base and fingerprinted ones once for all) on the stored models: no training or attack is
    redone, no row is duplicated, and the store gives what a fresh run gives."""
    from meraser.utils import read_json, write_json, write_jsonl

    path = _write(tmp_path, _matrix(tmp_path, tiny_dir))
    out = tmp_path / "bench"
    run_bench(load_matrix(path), progress=False)
    fresh = _table(out)
    took = {r["cell"]: r["cell_seconds"] for r in read_jsonl(out / RESULTS)}
    trained = sorted((out / "cells").glob("*/*/*.safetensors"))
    assert {p.parent.name for p in trained} >= {"erased", "recovered", "attacked"}
    made = {p: p.stat().st_mtime_ns for p in trained}

    def wrong(r):  # what an evaluation bug left in every row
        return {**r, "fsr": 0.5, "false_positive_rate": 0.5}

    write_jsonl(out / RESULTS, [wrong(r) for r in read_jsonl(out / RESULTS)])
    for f in (out / "cells").glob("*/results.jsonl"):
        write_jsonl(f, [wrong(r) for r in read_jsonl(f)])
    for f in (out / "shared" / "evals").glob("*.json"):
        write_json(f, wrong(read_json(f)))
    assert run_bench(load_matrix(path), progress=False)["ran"] == 0  # not asked: nothing is redone
    res = run_bench(load_matrix(path), progress=False, reevaluate=True)
    assert res["reverified"] == 2 and res["ran"] == 0 and res["failed"] == []
    assert _table(out) == fresh  # no row twice, every figure measured again
    assert all(read_json(f)["fsr"] != 0.5 for f in (out / "shared" / "evals").glob("*.json"))
    for f in (out / "cells").glob("*/results.jsonl"):
        assert len(read_jsonl(f)) == len({r["stage"] for r in read_jsonl(f)}) and all(
            r["fsr"] != 0.5 for r in read_jsonl(f))
    assert {p: p.stat().st_mtime_ns for p in trained} == made  # nothing trained or attacked again
    # a cell's cost stays what making it took; the re-evaluation's time is recorded beside it
    assert all(r["cell_seconds"] == took[r["cell"]] and r["reverified_seconds"] > 0 for r in read_jsonl(out / RESULTS))


def test_a_fingerprints_attacks_plan_only_those_cells_with_the_ids_the_full_product_gives(tmp_path):
    """`attacks:` beside a fingerprint picks entries of the matrix's `attacks:` as written there (a name alone is the
    entry with no config): that fingerprint gets only those cells, each with the id it has without the pick (so a
    store made before keeps its rows), and the other fingerprints keep every attack."""
    from meraser.bench import Matrix, plan_cells

    strong = {"method": "meraser", "config": {"erase": {"preset": "strong"}}}
    attacks = ["meraser", strong, "finetune", {"method": "merge-ties", "grid": {"attack.config.density": [0.2, 0.4]}}]
    utf, chain = {"method": "utf"}, {"method": "chain-hash"}
    common = {"out": str(tmp_path / "b"), "models": ["m"], "attacks": attacks, "seeds": [0, 1]}
    full = plan_cells(Matrix.from_dict({**common, "fingerprints": [utf, chain]}))
    picked = plan_cells(Matrix.from_dict({**common, "fingerprints": [
        utf, {**chain, "attacks": ["meraser", {"method": "merge-ties", "grid": {"attack.config.density": [0.2, 0.4]}}]}]}))
    assert len(full) == 2 * 5 * 2 and len(picked) == 10 + 3 * 2
    assert [c.id for c in picked] == [c.id for c in full if "utf" in c.id
                                      or ("strong" not in json.dumps(c.experiment) and c.attack["method"] != "finetune")]
    assert {(c.attack["method"], c.seed) for c in picked if "chain" in c.id} == {
        ("meraser", 0), ("meraser", 1), ("merge-ties", 0), ("merge-ties", 1)}


@pytest.mark.parametrize("only,fragment", [
    (["meraser-strong"], "fingerprints[0].attacks[0].method: unknown attack 'meraser-strong'; did you mean"),
    ([{"method": "meraser", "config": {"clean": {"magpie": 0.5}}}],
     'fingerprints[0].attacks[0]: {"method": "meraser", "config": {"clean": {"magpie": 0.5}}} is not one of the '
     'matrix\'s attacks (with that method: {"method": "meraser"}, {"method": "meraser", "config": {"erase": '
     '{"preset": "strong"}}})'),
    (["finetune"], "fingerprints[0].attacks[0]: \"finetune\" is not one of the matrix's attacks"),
    ([], "fingerprints[0].attacks: a non-empty list of the matrix's attacks"),
    (["meraser", "meraser"], "fingerprints[0].attacks[1]: the same as [0]"),
])
def test_a_fingerprints_attacks_outside_the_matrix_are_refused(tmp_path, only, fragment):
    from meraser.bench import Matrix, plan_cells

    strong = {"method": "meraser", "config": {"erase": {"preset": "strong"}}}
    matrix = Matrix.from_dict({"out": str(tmp_path / "b"), "models": ["m"], "attacks": ["meraser", strong],
                               "fingerprints": [{"method": "utf", "attacks": only}]})
    with pytest.raises(MeraserError) as e:
        plan_cells(matrix, where="matrix.yaml: ")
    assert fragment in str(e.value)
