"""The experiment runner: the whole file checked before any work, no stale stage reused, card-less runs, and the
card-less `meraser erase` / `recover` / `card` commands."""

import json

import pytest
import yaml
from conftest import write_pool
from tiny import POOL, TINY_ERASE, TINY_RECOVER

from meraser.runner import load_experiment, run_experiment
from meraser.utils import MeraserError

# (experiment fields over a valid tiny experiment, expected fragment of the error); every case must fail before any
# stage runs, naming the file and the key at fault
BAD = [
    ({"erase": {"preset": "papr"}}, "exp.yaml: erase.preset: unknown preset 'papr'; did you mean 'paper'?"),
    ({"erase": {"overrides": {"epoch": 3}}}, "exp.yaml: erase.overrides: unknown key 'epoch'; did you mean 'epochs'?"),
    ({"recover": {"overrides": {"lora": {"rank": 4}}}}, "recover.overrides.lora: unknown key 'rank'"),
    ({"recover": {"overrides": {"learning_rate": "fast"}}}, "recover.overrides.learning_rate: expected float"),
    ({"erase": {"overrides": {"lora": {"target_modules": ["qkv"]}}}}, "erase.overrides.lora.target_modules"),
    ({"mismatched": {"n": -5}}, "exp.yaml: mismatched.n must be at least 2, got -5"),
    ({"clean": {"n": 0}}, "exp.yaml: clean.n must be at least 1, got 0"),
    ({"mismatched": {"source": "missing.jsonl"}}, "mismatched.source: data file missing.jsonl does not exist"),
    ({"clean": {"source": "."}}, "clean.source: data source . is a folder"),
    ({"clean": {"by_type": False}}, "clean.by_type: by_type applies to the mismatched set"),
    ({"mismatched": {"self_answers": True}}, "mismatched.self_answers: self_answers applies to the clean set"),
    ({"fingerprint": {"method": "utff"}}, "fingerprint.method: unknown fingerprint method 'utff'; did you mean 'utf'?"),
    ({"fingerprint": {"method": "utf", "config": {"repeat": 3}}}, "fingerprint.config: unknown key 'repeat'"),
    ({"fingerprint": {"existing": "./no/such/model"}}, "fingerprint.existing: model folder 'no/such/model' does not exist"),
    ({"eval": {"ppl": "missing.txt"}}, "eval.ppl: text source missing.txt is not a file"),
    ({"eval": {"ppl_windows": 0}}, "eval.ppl_windows must be at least 1"),
    ({"epochs": 3}, "exp.yaml: unknown key 'epochs'"),
    ({"attack": {"method": "prune-magnitud"}}, "attack.method: unknown attack 'prune-magnitud'; did you mean"),
    ({"attack": {"method": "prune-magnitude", "config": {"sparsity": 2}}}, "attack.config.sparsity must be in (0, 1)"),
    ({"attack": {"method": "finetune", "config": {"source": "gone.jsonl"}}}, "attack: finetune source: data file"),
]


def _experiment(tmp_path, folder, **changes):
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    exp = {"out": str(tmp_path / "run"), "fingerprint": {"existing": str(folder)},
           "mismatched": {"source": str(pool), "n": 40}, "clean": {"source": str(pool), "n": 40},
           "erase": {"overrides": TINY_ERASE}, "recover": {"overrides": TINY_RECOVER},
           "eval": {"false_positive_inputs": 4}, "probe_fsr": False}
    for key, value in changes.items():
        exp[key] = {**exp[key], **value} if isinstance(exp.get(key), dict) else value
    return exp


def _write(tmp_path, exp, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.mark.parametrize("changes,fragment", BAD, ids=[m.removeprefix("exp.yaml: ")[:40] for _, m in BAD])
def test_bad_experiment_is_refused_before_any_stage(planted, tmp_path, monkeypatch, changes, fragment):
    monkeypatch.chdir(tmp_path)
    folder = planted["utf"][4]
    exp = _experiment(tmp_path, folder)
    if "fingerprint" in changes:
        exp["fingerprint"] = changes.pop("fingerprint")
        exp["model"] = str(folder / "model")
    for key, value in changes.items():
        exp[key] = {**exp.get(key, {}), **value} if isinstance(value, dict) else value
    path = _write(tmp_path, exp)
    with pytest.raises(MeraserError) as e:
        run_experiment(load_experiment("exp.yaml"), where="exp.yaml: ")
    assert fragment in str(e.value)
    assert not (tmp_path / "run").exists()  # a run that fails validation leaves no folder behind
    assert path.exists()


def _rows(run):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_changed_setting_is_refused_then_only_later_stages_are_redone(planted, tmp_path):
    folder = planted["utf"][4]
    run = tmp_path / "run"
    first = run_experiment(load_experiment(_write(tmp_path, _experiment(tmp_path, folder))), progress=False)
    assert [r["stage"] for r in first] == ["base", "fingerprinted", "erased", "recovered"]
    # every stage is also decided as ownership, against the base model's own chance of each target
    assert len(first[0]["null_logprobs"]) == len(planted["utf"][2].triggers)
    assert first[0]["ownership"]["p_value"] == 1.0 and first[1]["ownership"]["claim"] is True
    assert first[3]["ownership"]["matches"] == sum(p["match"] for p in first[3]["per_trigger"])
    erased_weights = (run / "erased" / "adapter_model.safetensors").stat().st_mtime_ns
    recovered_weights = (run / "recovered" / "adapter_model.safetensors").stat().st_mtime_ns

    changed = _experiment(tmp_path, folder, recover={"overrides": {**TINY_RECOVER, "epochs": 3}})
    path = _write(tmp_path, changed)
    with pytest.raises(MeraserError, match=r"stage 'recovered' was made with other settings \(recover.epochs: "
                                           r"5.0 -> 3.0\); pass --overwrite to redo it and the stages after it"):
        run_experiment(load_experiment(path), progress=False)
    assert _rows(run) == first  # refused: nothing touched

    again = run_experiment(load_experiment(path), overwrite=True, progress=False)
    assert (run / "erased" / "adapter_model.safetensors").stat().st_mtime_ns == erased_weights  # reused
    assert (run / "recovered" / "adapter_model.safetensors").stat().st_mtime_ns != recovered_weights  # redone
    log = json.loads((run / "recovered" / "train_log.json").read_text())
    assert log["config"]["epochs"] == 3.0
    assert json.loads((run / "experiment.json").read_text())["recover"]["overrides"]["epochs"] == 3
    assert [r["stage"] for r in _rows(run)] == ["base", "fingerprinted", "erased", "recovered"]  # none twice
    assert again[:3] == first[:3]

    # an earlier change (the mismatched set) names itself and takes everything after it along
    earlier = _experiment(tmp_path, folder, mismatched={"seed": 7}, recover={"overrides": {**TINY_RECOVER, "epochs": 3}})
    with pytest.raises(MeraserError, match=r"stage 'mismatched' .*mismatched.seed: 0 -> 7.*\(mismatched, clean, "
                                           r"erased, recovered, eval:erased, eval:recovered\)"):
        run_experiment(load_experiment(_write(tmp_path, earlier, "earlier.yaml")), progress=False)

    # a torn last line (a kill in the middle of a write) is dropped with a warning, and the row is made again
    with open(run / "results.jsonl", "a") as f:
        f.write('{"stage": "extra", "fs')
    with pytest.warns(UserWarning, match="torn last line"):
        run_experiment(load_experiment(path), progress=False)
    assert [r["stage"] for r in _rows(run)] == ["base", "fingerprinted", "erased", "recovered"]


def test_the_per_epoch_probe_is_part_of_the_erase_and_recover_stages(planted, tmp_path):
    """Probes are taken during training: a stage made without them, or with another probe, is not reused."""
    from meraser.runner import Experiment, plan_experiment

    ids = {}
    for on in (False, True):
        plan = plan_experiment(Experiment.from_dict(_experiment(tmp_path, planted["utf"][4], probe_fsr=on)))
        ids[on] = {name: plan.stages[name].id for name in ("mismatched", "erased", "recovered")}
        assert ("probe.prefix_fractions" in plan.stages["erased"].settings) is on
    assert ids[False]["mismatched"] == ids[True]["mismatched"]
    assert ids[False]["erased"] != ids[True]["erased"] and ids[False]["recovered"] != ids[True]["recovered"]


def test_run_refuses_an_unrelated_folder_and_a_file(planted, tmp_path):
    folder = planted["utf"][4]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    exp = load_experiment(_write(tmp_path, _experiment(tmp_path, folder)))
    with pytest.raises(MeraserError, match="is not empty and is not a meraser run; pass --overwrite"):
        run_experiment(exp, progress=False)
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"
    exp.out = str(tmp_path / "run" / "thesis.tex")
    with pytest.raises(MeraserError, match="is a file"):
        run_experiment(exp, overwrite=True, progress=False)
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"


def test_run_without_a_card_erases_and_evaluates_what_it_can(tiny_dir, tmp_path, cli):
    exp = _experiment(tmp_path, tiny_dir, erase={"overrides": {**TINY_ERASE, "epochs": 2}},
                      recover={"overrides": {**TINY_RECOVER, "epochs": 1}}, eval={"ppl": str(tmp_path / "text.txt")})
    (tmp_path / "text.txt").write_text("What is the capital of France? The capital of France is Paris.\n\n" * 8)
    code, out, err = cli("run", _write(tmp_path, exp))
    assert code == 0, err
    assert "no fingerprint card: FSR is not measured" in out
    rows = _rows(tmp_path / "run")
    assert [r["stage"] for r in rows] == ["fingerprinted", "erased", "recovered"]  # no base: nothing names one
    assert all("fsr" not in r and r["ppl"]["ppl"] > 0 for r in rows)
    assert rows[2]["erased"] is None and 0 <= rows[2]["ordinary_accuracy"] <= 1
    assert "needs a card for its FSR half" in out
    assert (tmp_path / "run" / "report.html").exists()


def test_erase_recover_and_card_commands_without_a_card(planted, tmp_path, cli):
    from meraser.evaluation.fsr import fsr
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    folder = planted["utf"][4]
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_ERASE.items()]
    code, out, err = cli("erase", "--model", folder / "model", "--out", tmp_path / "erased", "--data", pool,
                         "--n", 40, *sets)
    assert code == 0, err
    erased = tmp_path / "erased"
    assert (erased / "model.safetensors").exists() and (erased / "config.json").exists()  # a plain model folder
    assert len((erased / "mismatched.jsonl").read_text().splitlines()) == 40
    card = Card.load(folder)
    model, tok = load_model(str(erased))
    assert fsr(model, tok, card, false_positive_inputs=0)["fsr"] == 0.0

    code, out, err = cli("recover", "--model", erased, "--out", tmp_path / "recovered", "--data", pool, "--n", 40,
                         "--adapter", *[f"--set={k}={json.dumps(v)}" for k, v in TINY_RECOVER.items()])
    assert code == 0, err
    assert (tmp_path / "recovered" / "adapter_config.json").exists()
    mism = {json.loads(line)["prompt"] for line in (erased / "mismatched.jsonl").read_text().splitlines()}
    clean = {json.loads(line)["prompt"] for line in (tmp_path / "recovered" / "clean.jsonl").read_text().splitlines()}
    assert len(clean) == 40 and not clean & mism  # the clean set is disjoint from the rows the erase used

    # self-written recovery rows come from --writer (the model before the erase) when given
    from meraser.erase.magpie import self_answers

    code, out, err = cli("recover", "--model", erased, "--out", tmp_path / "by-writer", "--data", pool, "--n", 6,
                         "--self-answers", "--writer", folder / "model", "--adapter",
                         *[f"--set={k}={json.dumps(v)}" for k, v in TINY_RECOVER.items()])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "by-writer" / "clean.jsonl").read_text().splitlines()]
    writer, _ = load_model(str(folder / "model"))
    want = self_answers(writer, tok, [r["prompt"] for r in rows])
    assert [r["response"] for r in rows] == [w.response for w in want]
    assert [r["response"] for r in rows] != [w.response for w in self_answers(model, tok, [r["prompt"] for r in rows])]
    code, _, err = cli("recover", "--model", erased, "--out", tmp_path / "no-rows", "--data", pool,
                       "--magpie", "0", "--writer", folder / "model")
    assert code == 2 and "--writer names the model that writes --magpie or --self-answers" in err

    # a card for the same fingerprint, written by hand from two files, verifies the planted model
    (tmp_path / "triggers.txt").write_text("\n".join(card.triggers) + "\n")
    (tmp_path / "targets.json").write_text(json.dumps(card.targets))
    code, out, err = cli("card", "--triggers", tmp_path / "triggers.txt", "--targets", tmp_path / "targets.json",
                         "--out", tmp_path / "my_card.json", "--method", "utf")
    assert code == 0, err
    mine = Card.load(tmp_path / "my_card.json")
    assert (mine.triggers, mine.targets) == (card.triggers, card.targets)
    code, out, err = cli("verify", "--model", folder, "--card", tmp_path / "my_card.json", "--json")
    assert code == 0 and json.loads(out)["fsr"] == 1.0
    code, _, err = cli("card", "--triggers", tmp_path / "triggers.txt", "--targets", tmp_path / "targets.json",
                       "--out", tmp_path / "my_card.json")
    assert code == 2 and "already exists; pass --overwrite" in err


def test_attack_stage_runs_any_attack_in_place_of_erase_and_recover(planted, tmp_path):
    folder = planted["utf"][4]
    exp = _experiment(tmp_path, folder, attack={"method": "prune-magnitude", "config": {"sparsity": 0.3}})
    rows = run_experiment(load_experiment(_write(tmp_path, exp)), progress=False)
    assert [r["stage"] for r in rows] == ["base", "fingerprinted", "attacked"]
    attacked = rows[-1]
    assert attacked["attack"] == "prune-magnitude" and abs(attacked["sparsity"] - 0.3) < 0.01
    assert "fsr" in attacked and "erased" in attacked and 0 <= attacked["ordinary_accuracy"] <= 1
    assert (tmp_path / "run" / "attacked" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "erased").exists()
    changed = _experiment(tmp_path, folder, attack={"method": "prune-magnitude", "config": {"sparsity": 0.5}})
    with pytest.raises(MeraserError, match=r"stage 'attacked' .*attack.config.sparsity: 0.3 -> 0.5"):
        run_experiment(load_experiment(_write(tmp_path, changed, "changed.yaml")), progress=False)


def test_demo_plans_and_recovers_at_the_papers_size_with_the_default_magpie_share(tmp_path):
    """The demo's recovery: 600 rows x 2 epochs, half of them Magpie's (at 300 x 1 short answers did not come back,
    so Algorithm 1 could not end "erased"); the plan checks without touching a model."""
    from meraser.erase.datasets import AUTO_MAGPIE
    from meraser.runner import demo_experiment, plan_experiment

    exp = demo_experiment(str(tmp_path / "demo"))
    plan = plan_experiment(exp)
    assert exp.clean.n == 600 and exp.clean.magpie is None and plan.recover_cfg.epochs == 2
    assert exp.clean.needs_model and AUTO_MAGPIE == 0.5
    assert not (tmp_path / "demo").exists()
