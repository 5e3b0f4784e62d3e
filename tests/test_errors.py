"""Every bad input gets one line naming the input and what is wrong, a non-zero exit, and nothing written.

The table is the specification: a new case is one line (arguments, expected fragment of the message)."""

import json
import shutil

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
    _fingerprint_folder(tmp_path, tiny_dir)
    _card_files(tmp_path)
    _bench_files(tmp_path, tiny_dir)
    (tmp_path / "remote").mkdir()  # a model that ships its own code
    (tmp_path / "remote" / "config.json").write_text(json.dumps({
        "model_type": "meraser_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (tmp_path / "no_task").mkdir()  # a BIG-bench folder with a generation task only
    (tmp_path / "no_task" / "questions.json").write_text("{}")
    shutil.copytree(tiny_dir, tmp_path / "erased4")  # a model `meraser erase` wrote from 4 mismatched rows
    (tmp_path / "erased4" / "mismatched.jsonl").write_text("".join(
        json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(4)))
    return f


def _fingerprint_folder(tmp_path, tiny_dir):
    """{tmp}/fp as `meraser fingerprint` writes it: model/ and the card beside it."""
    from meraser.fingerprints.card import Card

    shutil.copytree(tiny_dir, tmp_path / "fp" / "model")
    Card(method="custom", triggers=["a secret trigger"], targets=["a secret target"]).save(
        tmp_path / "fp" / "fingerprint_card.json")
    card = json.loads((tmp_path / "fp" / "fingerprint_card.json").read_text())
    card["targets"] = ["an edited target"]  # its checksum left as it was
    (tmp_path / "tampered.json").write_text(json.dumps(card))


def _card_files(tmp_path):
    (tmp_path / "gap.txt").write_text("a\n\nb\n")  # triggers a, '', b
    (tmp_path / "gap_targets.txt").write_text("x\ny\n\n")  # targets x, y, ''
    (tmp_path / "dup.txt").write_text("same trigger\nsame trigger\n")
    (tmp_path / "two_targets.txt").write_text("first target\nsecond target\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.json").write_text("[]")


def _bench_files(tmp_path, tiny_dir):
    base = {"models": [str(tiny_dir)], "fingerprints": [{"existing": str(tmp_path / "fp")}],
            "attacks": ["prune-magnitude"], "seeds": [0], "out": str(tmp_path / "bench_out")}
    for name, changes in {"file_out": {"out": str(tmp_path / "file.txt")},
                          "foreign_out": {"out": str(tmp_path / "not_a_model")},
                          "dup_seeds": {"seeds": [0, 0]},
                          "dup_attacks": {"attacks": ["prune-magnitude", "prune-magnitude"]},
                          "dup_grid": {"grid": {"attack.config.sparsity": [0.1, 0.1]}},
                          "tampered": {"fingerprints": [{"existing": str(tmp_path / "fp"),
                                                         "card": str(tmp_path / "tampered.json")}]}}.items():
        (tmp_path / f"bench_{name}.yaml").write_text(json.dumps({**base, **changes}))


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
    # an existing file is never replaced by a report without --overwrite, and with it only a page meraser wrote
    (["report", "{tmp}", "-o", "{tmp}/file.txt"], "file.txt already exists; pass --overwrite"),
    (["report", "{tmp}", "-o", "{tmp}/file.txt", "--overwrite"], "was not written by meraser report"),
    (["report", "{tmp}", "-o", "{tmp}/fp/model/model.safetensors", "--overwrite"], "was not written by meraser"),
    (["report", "{tmp}", "-o", "{tmp}/r.html", "--markdown", "{tmp}/file.txt"], "file.txt already exists"),
    # an input is never written: not the model, nothing inside it, not the folder that holds it and its card
    (["attack", "--method", "prune-magnitude", "--model", "{tmp}/fp", "--out", "{tmp}/fp/model/sub"],
     "lies inside the model"),
    (["attack", "--method", "prune-magnitude", "--model", "{tmp}/fp", "--out", "{tmp}/fp/model", "--overwrite"],
     "is the model"),
    (["attack", "--method", "prune-magnitude", "--model", "{tmp}/fp", "--out", "{tmp}/fp", "--overwrite"],
     "holds the model"),
    (["erase", "--model", "{tmp}/fp/model", "--out", "{tmp}/fp/model/sub"], "lies inside the model"),
    (["erase", "--model", "{tmp}/fp/model", "--out", "{tmp}/fp/model", "--overwrite"], "is the model"),
    (["erase", "--model", "{tmp}/fp/model", "--out", "{tmp}/fp", "--overwrite"], "holds the model"),
    (["recover", "--model", "{tmp}/fp/model", "--out", "{tmp}/fp", "--overwrite"], "holds the model"),
    (["train", "--model", "{tiny}", "--data", "{tmp}/pairs.jsonl", "--out", "{tmp}", "--overwrite"],
     "holds the --data file"),
    (["fingerprint", "--method", "utf", "--model", "{tmp}/fp/model", "--out", "{tmp}/fp", "--overwrite"],
     "holds the model"),
    (["card", "--triggers", "{tmp}/two.txt", "--targets", "{tmp}/two_targets.txt", "--out", "{tmp}/two.txt",
      "--overwrite"], "is the triggers file"),
    # cards pair line i with line i: no blank line, no duplicate trigger, no empty file
    (["card", "--triggers", "{tmp}/gap.txt", "--targets", "{tmp}/gap_targets.txt", "--out", "{tmp}/c.json"],
     "gap.txt:2: blank line in the triggers file"),
    (["card", "--triggers", "{tmp}/two.txt", "--targets", "{tmp}/gap_targets.txt", "--out", "{tmp}/c.json"],
     "gap_targets.txt:3: blank line in the targets file"),
    (["card", "--triggers", "{tmp}/dup.txt", "--targets", "{tmp}/two_targets.txt", "--out", "{tmp}/c.json"],
     "dup.txt:2: duplicate trigger (the same as line 1)"),
    (["card", "--triggers", "{tmp}/empty.txt", "--targets", "{tmp}/empty.txt", "--out", "{tmp}/c.json"],
     "holds no triggers"),
    (["card", "--triggers", "{tmp}/empty.json", "--targets", "{tmp}/empty.json", "--out", "{tmp}/c.json"],
     "holds no triggers"),
    # a bench: a folder it may write into, each cell planned once, every card checked before the first cell
    (["bench", "{tmp}/bench_file_out.yaml"], "file.txt is a file, not a folder"),
    (["bench", "{tmp}/bench_foreign_out.yaml"], "is a folder that no meraser bench wrote (it holds notes.txt)"),
    (["bench", "{tmp}/bench_dup_seeds.yaml"], "seeds[1]: the same as seeds[0]"),
    (["bench", "{tmp}/bench_dup_attacks.yaml"], "attacks[1]: the same as attacks[0]"),
    (["bench", "{tmp}/bench_dup_grid.yaml"], "grid.attack.config.sparsity[1]: the same as attack.config.sparsity[0]"),
    (["bench", "{tmp}/bench_tampered.yaml"], "tampered.json: card checksum mismatch"),
    # a model that ships its own code is never run without the flag, and says so in one line
    (["verify", "--model", "{tmp}/remote", "--card", "{tmp}/fp"], "none was run. Pass --trust-remote-code"),
    (["attack", "--method", "prune-magnitude", "--model", "{tmp}/remote", "--out", "{tmp}/out"],
     "Pass --trust-remote-code"),
    (["evaluate", "--model", "{tiny}", "--tasks", "{tmp}/no_task"],
     "not a BIG-bench task folder: no task.json or task_mc.json (it holds: questions.json)"),
    (["recover", "--model", "{tmp}/erased4", "--out", "{tmp}/out", "--data", "{tmp}/pairs.jsonl",
      "--replay-mismatched", "50"], "the erase trained on only 4 mismatched rows"),
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
