"""Nothing lost, nothing leaked: resuming only what the same settings made, Ctrl-C messages that say what was kept,
reports that never replace what they did not write, results that only their owner can read."""

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import write_pool
from tiny import POOL

from meraser.utils import MeraserError


class _Stop:
    """A TrainerCallback that stands for Ctrl-C: after the first checkpoint is saved, or before the first step."""

    def __new__(cls, when: str):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if when == "after-save":
                    raise KeyboardInterrupt

            def on_step_begin(self, args, state, control, **kw):
                if when == "before-save":
                    raise KeyboardInterrupt

        return Stop()


def _cfg(**changes):
    from meraser.training import TrainConfig

    return TrainConfig.from_dict({"epochs": 3, "batch_size": 4, "save_steps": 2, "learning_rate": 1e-3, **changes})


def _interrupted(tiny_dir, out, rows, cfg, when="after-save"):
    from meraser.models import load_model
    from meraser.training import train

    m, tok = load_model(str(tiny_dir))
    with pytest.raises(KeyboardInterrupt):
        train(m, tok, rows, cfg, out, callbacks=[_Stop(when)], progress=False)


@pytest.mark.parametrize("changed,fragment", [
    ({"cfg": {"epochs": 4}}, "epochs: 3.0 -> 4.0"),
    ({"cfg": {"lora": {"r": 8}}}, "lora.r: 16 -> 8"),  # was a size-mismatch traceback
    ({"rows": 8}, "rows: 16 -> 8"),  # was: 0 steps trained, exit 0, a model labelled as trained on the new rows
])
def test_resume_under_other_settings_is_refused_naming_the_setting(tiny_dir, tmp_path, changed, fragment):
    from meraser.models import load_model
    from meraser.training import train, work_dir

    out = tmp_path / "out"
    _interrupted(tiny_dir, out, POOL[:16], _cfg())
    m, tok = load_model(str(tiny_dir))
    with pytest.raises(MeraserError) as e:
        train(m, tok, POOL[:changed.get("rows", 16)], _cfg(**changed.get("cfg", {})), out, resume=True, progress=False)
    assert fragment in str(e.value) and "--overwrite" in str(e.value)
    assert not out.exists() and any(work_dir(out).glob("checkpoint-*"))  # the checkpoints are kept for a true resume
    res = train(m, tok, POOL[:16], _cfg(), out, resume=True, progress=False)  # the same settings resume
    assert res.metrics["resumed_from"] and res.metrics["steps"] == 12 and out.is_dir()


def test_erase_resume_with_other_rows_ctrl_c_and_resume_messages(cli, tiny_dir, tmp_path, monkeypatch):
    """Through the CLI: Ctrl-C after a checkpoint names --resume and the checkpoint; a resume with another --n is
    refused in one line; Ctrl-C before the first checkpoint says nothing was saved; --resume with nothing to resume
    says it starts from the beginning."""
    import meraser.training as training

    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    args = ["erase", "--model", tiny_dir, "--out", tmp_path / "erased", "--data", pool, "--set", "save_steps=2",
            "--set", "batch_size=8"]
    callbacks = training._callbacks
    monkeypatch.setattr(training, "_callbacks", lambda *a: callbacks(*a) + [_Stop("after-save")])
    code, _, err = cli(*args, "--n", "40")
    assert code == 130 and "re-run the same command with --resume" in err and "checkpoint-2" in err
    monkeypatch.setattr(training, "_callbacks", callbacks)
    code, _, err = cli(*args, "--n", "20", "--resume")
    assert code == 2 and "rows: 40 -> 20" in err and "Traceback" not in err and not (tmp_path / "erased").exists()

    monkeypatch.setattr(training, "_callbacks", lambda *a: callbacks(*a) + [_Stop("before-save")])
    code, _, err = cli(*args[:4], tmp_path / "other", *args[5:], "--n", "40")
    assert code == 130 and "before the first checkpoint: nothing was saved" in err and "--resume" not in err
    monkeypatch.setattr(training, "_callbacks", callbacks)
    code, _, err = cli(*args[:4], tmp_path / "other", *args[5:], "--n", "40", "--resume", "--set", "epochs=1")
    assert code == 0 and "no checkpoint to continue from" in err and (tmp_path / "other").is_dir()


def test_ctrl_c_message_names_the_command_that_resumes_by_itself():
    from meraser.cli import interrupted_message

    assert "`meraser bench`" in interrupted_message(["bench", "m.yaml"]) and "cells" in \
        interrupted_message(["bench", "m.yaml"])
    assert "`meraser run`" in interrupted_message(["run", "e.yaml"])
    assert interrupted_message(["verify", "--model", "x"]) == "interrupted; nothing was written"


def private_files_check(folder: Path, secrets: list[str]) -> dict[str, str]:
    """Every file under `folder` that holds one of `secrets`, with its mode when others may read it."""
    leaks = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix not in (".safetensors", ".png"):
            text = p.read_text(errors="ignore")
            if any(s in text for s in secrets) and p.stat().st_mode & 0o077:
                leaks[str(p.relative_to(folder))] = oct(stat.S_IMODE(p.stat().st_mode))
    return leaks


def test_every_file_of_a_run_that_holds_a_secret_is_owner_only(tmp_path, tiny_dir, planted):
    """results.jsonl (per-trigger outputs), stage records, reports: 0600 wherever a trigger or target appears."""
    from tiny import TINY_ERASE, TINY_RECOVER

    from meraser.fingerprints.card import Card
    from meraser.runner import Experiment, run_experiment

    folder = planted["if-sft"][4]
    card = Card.load(folder / "fingerprint_card.json")
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    umask = os.umask(0o022)  # a usual user's: files others may read unless meraser says otherwise
    exp = Experiment.from_dict({"out": str(tmp_path / "run"), "model": str(tiny_dir),
                                "fingerprint": {"existing": str(folder)},
                                "mismatched": {"source": str(pool), "n": 20}, "clean": {"source": str(pool), "n": 20},
                                "erase": {"overrides": {**TINY_ERASE, "epochs": 2}},
                                "recover": {"overrides": {**TINY_RECOVER, "epochs": 1}},
                                "eval": {"false_positive_inputs": 2}, "eval_base": False})
    try:
        run_experiment(exp, progress=False)
    finally:
        os.umask(umask)
    from meraser.report import write_report

    write_report([tmp_path / "run"], tmp_path / "run" / "report.html", show_secrets=True)
    # as written, and as JSON writes them (a trigger's newline is \\n there)
    secrets = [form for t in card.triggers + card.targets if len(t) > 8 for form in (t, json.dumps(t)[1:-1])]
    assert any(card.triggers[0] in json.loads(line).get("per_trigger", [{}])[0].get("trigger", "")
               for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines())
    assert private_files_check(tmp_path / "run", secrets) == {}


def test_report_replaces_its_own_page_and_reads_a_torn_results_line_like_a_bench(cli, tmp_path):
    """One rule for run and bench folders: a torn last line (a kill while appending) is dropped with a warning."""
    run = tmp_path / "run"
    run.mkdir()
    row = {"stage": "fingerprinted", "fsr": 1.0, "false_positive_rate": 0.0}
    (run / "results.jsonl").write_text(json.dumps(row) + "\n" + '{"stage": "erased", "fs')
    assert cli("report", run, "-o", tmp_path / "r.html")[0] == 0
    code, _, err = cli("report", run, "-o", tmp_path / "r.html")
    assert code == 2 and "already exists; pass --overwrite" in err
    page = (tmp_path / "r.html").read_text()
    assert cli("report", run, "-o", tmp_path / "r.html", "--overwrite", "--markdown", tmp_path / "t.md")[0] == 0
    assert cli("report", run, "-o", tmp_path / "r.html", "--overwrite", "--markdown", tmp_path / "t.md")[0] == 0
    assert (tmp_path / "r.html").read_text() == page


def test_a_big_bench_folder_with_only_task_mc_uses_it(tmp_path):
    """BIG-bench's truthful_qa keeps its multiple-choice examples in task_mc.json (no task.json)."""
    from meraser.evaluation.zeroshot import resolve_tasks

    folder = tmp_path / "truthful_qa"
    folder.mkdir()
    (folder / "questions.json").write_text("{}")
    (folder / "task_mc.json").write_text(json.dumps({"examples": [
        {"input": "Is the sky green?", "target_scores": {"no": 1, "yes": 0}}]}))
    names, work = resolve_tasks([str(folder)], tmp_path / "work")
    assert names == ["bb_truthful_qa_mc"] and (tmp_path / "work" / "bb_truthful_qa_mc.jsonl").is_file()


def test_a_run_folder_held_by_another_process_is_refused(tmp_path, tiny_dir):
    """The lock is the kernel's: while another holder has OUT/.lock, `meraser run` on OUT stops before any stage,
    naming the holder; once it lets go (as a killed process does), the folder is free."""
    import subprocess
    import sys

    from meraser.runner import Experiment, run_experiment

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from meraser.utils import exclusive\n"
                               f"with exclusive({str(out)!r}, 'run folder'):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    exp = Experiment.from_dict({"out": str(out), "model": str(tiny_dir), "fingerprint": {"existing": str(tiny_dir)},
                                "attack": {"method": "prune-magnitude"}, "eval_base": False})
    with pytest.raises(MeraserError) as e:
        run_experiment(exp, progress=False)
    assert f"run folder {out} is in use by another meraser process (pid {holder.pid})" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else was written
    holder.kill()
    holder.wait()
    run_experiment(exp, progress=False)  # the lock went with its holder
    assert (out / "results.jsonl").is_file()


def test_card_prints_its_checksum_as_a_commitment(cli, tmp_path):
    """The checksum guards against accidental edits only (README); published, it commits the owner to the card."""
    from meraser.fingerprints.card import Card

    (tmp_path / "t.txt").write_text("trigger one\ntrigger two\n")
    (tmp_path / "y.txt").write_text("target one\ntarget two\n")
    code, out, err = cli("card", "--triggers", tmp_path / "t.txt", "--targets", tmp_path / "y.txt", "--out",
                         tmp_path / "card.json")
    assert code == 0, err
    checksum = Card.load(tmp_path / "card.json").checksum
    assert checksum in out.replace("\n", "") and len(checksum) == 64
    assert json.loads((tmp_path / "card.json").read_text())["checksum"] == checksum
