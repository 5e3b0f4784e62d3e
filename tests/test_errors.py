"""Every bad input gets one line naming the input and what is wrong, a non-zero exit, and nothing written.

The table is the specification: a new case is one line (arguments, expected fragment of the message)."""

import json

import pytest

BINARY = bytes(range(128, 256)) * 4


@pytest.fixture
def inputs(tmp_path, tiny_dir):
    """Named inputs the cases refer to as {name}."""
    f = {"tiny": tiny_dir, "tmp": tmp_path}
    (tmp_path / "bin.jsonl").write_bytes(BINARY)
    (tmp_path / "bin.json").write_bytes(b'{"a": "' + BINARY + b'"}')
    (tmp_path / "bin.txt").write_bytes(BINARY)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    (tmp_path / "file.txt").write_text("precious")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Hi there friend", "response": "Hello to you"}) + "\n")
    (tmp_path / "two.txt").write_text("first trigger\nsecond trigger\n")
    (tmp_path / "one.txt").write_text("only target\n")
    (tmp_path / "yaml_typo.yaml").write_text(f"fingerprint: {{existing: {tiny_dir}}}\nerase: {{overrides: {{epoch: 3}}}}\n")
    return f


TRAIN = ["train", "--model", "{tiny}", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/out"]
CASES = [
    # (arguments, fragment of the one-line message)
    (["train", "--model", "{tiny}", "--data", "{tmp}/bin.jsonl", "--out", "{tmp}/out"], "not UTF-8 text"),
    (["verify", "--model", "{tiny}", "--card", "{tmp}/bin.json"], "not UTF-8 text"),
    (["evaluate", "--model", "{tiny}", "--ppl", "{tmp}/bin.txt"], "not UTF-8 text"),
    (["run", "{tmp}/bin.txt"], "not UTF-8 text"),
    (["train", "--model", "{tiny}", "--data", "{tmp}/a_folder", "--out", "{tmp}/out"], "is a folder"),
    (["train", "--model", "{tiny}", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/file.txt/sub"],
     "file.txt is a file, not a folder"),
    (["train", "--model", "{tiny}", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/file.txt", "--overwrite"],
     "refusing to replace it"),
    (TRAIN + ["--target-modules", "q_proj,qkv_proj"], "['qkv_proj'] match no module"),
    (["train", "--model", "{tmp}/not_a_model", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/out"],
     "is a folder but not a model"),
    (["train", "--model", "{tmp}/missing_model", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}/out"],
     "does not exist"),
    (["chat", "hello", "--model", "{tiny}", "--max-new-tokens", "0"], "Invalid value"),
    (["evaluate", "--model", "{tiny}", "--ppl-windows", "0"], "Invalid value"),
    (["report", "{tmp}", "-o", "{tmp}/file.txt/report.html"], "file.txt is a file, not a folder"),
    (["erase", "--model", "{tiny}", "--out", "{tmp}/out", "--set", "epoch=3"], "did you mean 'epochs'"),
    (["erase", "--model", "{tiny}", "--out", "{tmp}/out", "--preset", "papr"], "did you mean 'paper'"),
    (["erase", "--model", "{tiny}", "--out", "{tmp}/out", "--data", "{tmp}/missing.jsonl"], "does not exist"),
    (["erase", "--model", "{tiny}", "--out", "{tmp}/out", "--set", "lora.target_modules=[c_attn]"],
     "match no module"),
    (["recover", "--model", "{tmp}/not_a_model", "--out", "{tmp}/out"], "is a folder but not a model"),
    (["card", "--triggers", "{tmp}/two.txt", "--targets", "{tmp}/one.txt", "--out", "{tmp}/out"],
     "holds 2 triggers but"),
    (["card", "--triggers", "{tmp}/bin.txt", "--targets", "{tmp}/one.txt", "--out", "{tmp}/out"], "not UTF-8 text"),
    (["run", "{tmp}/yaml_typo.yaml", "--out", "{tmp}/out"], "yaml_typo.yaml: erase.overrides: unknown key 'epoch'"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_gets_one_clear_line_and_writes_nothing(cli, inputs, argv, fragment):
    tmp = inputs["tmp"]
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code, out, err = cli(*[a.format(**inputs) for a in argv])
    assert code != 0
    assert fragment in err, err
    assert "Traceback" not in err + out
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing written, nothing removed
    assert (tmp / "file.txt").read_text() == "precious"


def test_every_option_shows_its_default_in_help():
    import typer

    from meraser.cli import app

    def commands(group):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd)
            else:
                yield name, cmd

    missing = [f"{name} {p.opts[0]}" for name, cmd in commands(typer.main.get_command(app)) for p in cmd.params
               if p.param_type_name == "option" and not p.required and p.name != "help"
               and p.default is None and not p.show_default]
    assert missing == []


def test_ctrl_c_during_training_says_how_to_resume(tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from meraser.training import _complete, work_dir

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                            for i in range(16)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "meraser.cli", "train", "--model", str(tiny_dir), "--data",
                             str(data), "--out", str(out), "--epochs", "400", "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (`cmd &`) ignores SIGINT, and a child that inherits
                            # that never sees Ctrl-C: give it the terminal's default, as a user's shell would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # wait for a complete checkpoint: one interrupted while being written is dropped (by design), leaving none
    while time.time() < deadline and not any(map(_complete, work_dir(out).glob("checkpoint-*"))) \
            and proc.poll() is None:
        time.sleep(0.2)
    finished_first = proc.poll() is not None  # a run that ended before the signal: say so, not just "0 != 130"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (f"exit {proc.returncode}; the run had {'ended' if finished_first else 'not ended'}"
                                    f" when SIGINT was sent; checkpoints: {sorted(work_dir(out).glob('*'))}; "
                                    f"stderr tail: {err[-1500:]}")
    assert "interrupted; re-run the same command" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists() and any(work_dir(out).glob("checkpoint-*"))
