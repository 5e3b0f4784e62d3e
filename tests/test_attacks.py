"""The attack registry: every attack runs on the tiny fingerprinted model and writes a folder `verify` accepts;
merging is exact where it must be and agrees with mergekit; bad input is refused before any work."""

import copy
import json

import pytest
import torch
from conftest import write_pool
from tiny import POOL, TINY_ERASE, save_tiny, tiny_model, tiny_tokenizer

from meraser.attacks import REGISTRY, get_attack
from meraser.attacks.base import AttackContext, apply_attack, is_decoding
from meraser.models import load_model


STRUCTURED = ("prune-l1", "prune-l2", "prune-random", "prune-taylor")


def tiny_settings(pool):
    quick = {"epochs": 1, "save_steps": -1}
    expert = {"expert_data": str(pool), "expert_rows": 16, "expert_train": quick}
    erase = {"mismatched": {"source": str(pool), "n": 24}, "erase": {"overrides": {**TINY_ERASE, "epochs": 2}}}
    meraser = {**erase, "clean": {"source": str(pool), "n": 24}, "recover": {"overrides": quick}}
    return {
        "meraser": meraser, "meraser-cycles": {**meraser, "cycles": 2},
        "meraser-erase": erase, "meraser-transfer": erase,
        "finetune": {"source": str(pool), "n": 16, "train": quick},
        "prune-magnitude": {"sparsity": 0.3},
        **{f"prune-{i}": {"ratio": 0.34, "spare_first": 0, "spare_last": 1} for i in ("l1", "l2", "random")},
        "prune-taylor": {"ratio": 0.34, "spare_first": 0, "spare_last": 1, "calibration": str(pool),
                         "calibration_rows": 4},
        "prune-wanda": {"calibration": str(pool), "calibration_rows": 4, "sparsity": 0.3},
        "merge-task-arithmetic": expert, "merge-ties": expert, "merge-dare": expert,
        "cleangen": {"k": 4}, "token-forcing": {"context": "assistant", "threshold": 0.8, "batch_size": 128},
        "suppress-topk": {}, "detect-topk": {}, "suppress-neighbour": {}, "suppress-lookahead": {"lookahead_tokens": 4},
        "suppress-bigram": {"seed_words": 6, "calibration_texts": 2, "text_tokens": 4},
        "perplexity-filter": {"threshold": 50.0},
        "find-and-unlearn": {"contexts": ["assistant"], "threshold": 0.8, "expand_tokens": 6,
                             "retain_source": str(pool), "retain_rows": 8, "train": quick},
        "gri": {"draft_tokens": 8}, "gri-system": {},
    }


@pytest.fixture(scope="module")
def planted_three_per_group(tmp_path_factory):
    """UTF planted into a tiny model with 3 query heads per KV head (6 over 2, like SmolLM2's 9 over 3): the shared
    tiny model has 2 per KV head, which structured pruning refuses (torch-pruning loops on it)."""
    from conftest import tiny_cfg

    from meraser.fingerprints.embed import embed

    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("fp3") / "utf"
    embed("utf", tiny_model(tok, hidden=96, heads=6, kv_heads=2), tok, tiny_cfg("utf"), folder, progress=False)
    return folder


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_attack_writes_what_verify_accepts(planted, request, tmp_path, cli, name):
    folder = request.getfixturevalue("planted_three_per_group") if name in STRUCTURED else planted["utf"][4]
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in tiny_settings(pool)[name].items()]
    code, out, err = cli("attack", "--method", name, "--model", folder, "--out", tmp_path / "attacked", "--json", *sets)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["attack"] == name and summary["seconds"] >= 0
    assert not list(tmp_path.glob(".attacked.attack*"))  # the work folder is gone
    if is_decoding(REGISTRY[name]):  # no model: its record, and verify decodes the suspect through it
        record = json.loads((tmp_path / "attacked" / "attack.json").read_text())
        assert record["attack"] == name and not (tmp_path / "attacked" / "config.json").exists()
        extracted = tmp_path / "attacked" / "extracted.jsonl"
        verify_args = ["--model", folder, "--attack", name] + (
            [f"--set=sequences={extracted}"] if extracted.exists() else [])
    else:
        meta = json.loads((tmp_path / "attacked" / "meraser_model.json").read_text())
        assert meta["attack"] == name
        verify_args = ["--model", tmp_path / "attacked"]
    code, out, err = cli("verify", *verify_args, "--card", folder, "--json")
    assert code == 0, err
    assert 0.0 <= json.loads(out)["fsr"] <= 1.0


@pytest.fixture(scope="module")
def planted_gemma(tmp_path_factory):
    """UTF planted into a tiny Gemma-3-shaped model (sliding window, one KV head, no chat template)."""
    from conftest import tiny_cfg
    from tiny import save_tiny_gemma

    from meraser.fingerprints.embed import embed
    from meraser.models import load_model

    model, tok = load_model(str(save_tiny_gemma(tmp_path_factory.mktemp("gemma") / "base")))
    folder = tmp_path_factory.mktemp("fpg") / "utf"
    embed("utf", model, tok, tiny_cfg("utf"), folder, progress=False)
    return folder


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_attack_runs_on_a_gemma_shaped_model(planted_gemma, tmp_path, cli, name):
    """Every attack, structured pruning included (4 query heads over Gemma 3's one KV head: one query head of the
    group goes), on the Gemma-3-shaped model, and its output verifies."""
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in tiny_settings(pool)[name].items()]
    code, out, err = cli("attack", "--method", name, "--model", planted_gemma, "--out", tmp_path / "attacked",
                         "--json", *sets)
    assert code == 0, err
    target = ["--model", planted_gemma, "--attack", name] if is_decoding(REGISTRY[name]) else \
        ["--model", tmp_path / "attacked"]
    if name == "token-forcing":
        target += [f"--set=sequences={tmp_path / 'attacked' / 'extracted.jsonl'}"]
    code, out, err = cli("verify", *target, "--card", planted_gemma, "--json")
    assert code == 0, err


def _merge(tmp_path, method, weights, **extra):
    """Merge a tiny 'fingerprinted' model with a tiny 'expert', both random perturbations of one tiny base."""
    base_dir = save_tiny(tmp_path / "base", seed=0)
    tok = tiny_tokenizer()
    for name, seed in (("fp", 1), ("expert", 2)):
        m = tiny_model(tok, seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    model, tok = load_model(str(tmp_path / "fp"))
    attack = get_attack(method)
    cfg = attack.Config.from_dict({"weights": list(weights), "expert": str(tmp_path / "expert"), **extra})
    ctx = AttackContext(str(tmp_path / "fp"), str(base_dir), tmp_path / "work", progress=False)
    merged = apply_attack(attack, model, tok, cfg, ctx)
    states = {n: load_model(str(tmp_path / n))[0].state_dict() for n in ("base", "fp", "expert")}
    return merged.state_dict(), states


def test_task_arithmetic_with_weights_1_0_returns_the_fingerprinted_model(tmp_path):
    merged, s = _merge(tmp_path, "merge-task-arithmetic", (1.0, 0.0))
    assert all(torch.allclose(merged[k], s["fp"][k], atol=1e-6) for k in merged)
    mixed, _ = _merge(tmp_path / "b", "merge-task-arithmetic", (0.4, 0.6))
    k = "model.layers.0.mlp.up_proj.weight"
    expected = s["base"][k] + 0.4 * (s["fp"][k] - s["base"][k]) + 0.6 * (s["expert"][k] - s["base"][k])
    assert torch.allclose(mixed[k], expected, atol=1e-6)


def test_dare_with_p0_equals_task_arithmetic_and_keeps_the_expected_delta(tmp_path):
    ta, s = _merge(tmp_path / "ta", "merge-task-arithmetic", (0.5, 0.5))
    dare0, _ = _merge(tmp_path / "d0", "merge-dare", (0.5, 0.5), p=0.0)
    assert all(torch.allclose(ta[k], dare0[k], atol=1e-6) for k in ta)
    dare, _ = _merge(tmp_path / "d", "merge-dare", (1.0, 0.0), p=0.5, seed=3)
    again, _ = _merge(tmp_path / "d2", "merge-dare", (1.0, 0.0), p=0.5, seed=3)
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(dare[k], again[k])  # seeded
    delta, kept = s["fp"][k] - s["base"][k], dare[k] - s["base"][k]
    dropped = (kept.abs() < 1e-9).float().mean().item()
    assert 0.45 < dropped < 0.55  # half the entries dropped...
    survivors = kept.abs() > 1e-9
    assert torch.allclose(kept[survivors], 2 * delta[survivors], atol=1e-5)  # ...the rest rescaled by 1/(1-p)
    # the delta is kept in expectation: E[kept] = delta, so the projection of kept on delta is about |delta|^2
    assert abs((kept * delta).sum().item() / (delta * delta).sum().item() - 1) < 0.1


def test_our_merges_agree_with_mergekit(tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    ours, _ = _merge(tmp_path, "merge-task-arithmetic", (0.4, 0.6))
    # TIES takes the disjoint mean of the agreeing entries (the TIES paper, peft); mergekit divides by their summed
    # weights instead, which is the same at equal weights
    ties, _ = _merge(tmp_path / "t", "merge-ties", (1.0, 1.0), density=0.5)
    for method, mine, w, params in (("task_arithmetic", ours, (0.4, 0.6), {}),
                                    ("ties", ties, (1.0, 1.0), {"density": 0.5})):
        cfg = {"merge_method": method, "base_model": str(tmp_path / "base"), "dtype": "float32",
               "parameters": {"normalize": method == "ties"},
               "models": [{"model": str(tmp_path / "fp"), "parameters": {"weight": w[0], **params}},
                          {"model": str(tmp_path / "expert"), "parameters": {"weight": w[1], **params}}]}
        out = tmp_path / f"mk-{method}"
        run_merge(MergeConfiguration.model_validate(cfg), str(out), options=MergeOptions(copy_tokenizer=False))
        theirs = {}
        for f in out.glob("*.safetensors"):
            theirs.update(load_file(str(f)))
        shared = [k for k in mine if k in theirs]
        assert len(shared) >= len(mine) - 1  # the tied LM head is stored once
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in shared), method


def test_sparsity_attacks_reach_their_sparsity_and_wanda_differs_from_magnitude(planted, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    fp_model, tok = planted["utf"][0], planted["utf"][1]
    masks = {}
    for name, extra in (("prune-magnitude", {}), ("prune-wanda", {"calibration": str(pool), "calibration_rows": 4})):
        attack = get_attack(name)
        ctx = AttackContext("fp", None, tmp_path / name, progress=False)
        model = apply_attack(attack, copy.deepcopy(fp_model), tok, attack.Config.from_dict({"sparsity": 0.4, **extra}),
                             ctx)
        assert abs(ctx.info["sparsity"] - 0.4) < 0.01
        masks[name] = model.model.layers[0].mlp.up_proj.weight == 0
        assert model.lm_head.weight.eq(0).float().mean() < 0.01  # the head is kept
    assert not torch.equal(masks["prune-magnitude"], masks["prune-wanda"])


BAD = [
    (["--method", "prune-magnitud"], "unknown attack 'prune-magnitud'; did you mean 'prune-magnitude'?"),
    (["--method", "prune-magnitude", "--set", "sparsity=1.5"], "sparsity must be in (0, 1), got 1.5"),
    (["--method", "merge-dare", "--set", "p=1"], "p must be in [0, 1), got 1"),
    (["--method", "merge-ties", "--set", "weights=[0.5]"], "two weights"),
    (["--method", "finetune", "--set", "train={epoch: 2}"], "unknown key 'epoch'; did you mean 'epochs'?"),
    (["--method", "merge-task-arithmetic", "--set", "expert={tmp}/nowhere/expert"], "does not exist"),
    (["--method", "prune-l2", "--set", "ratio=0"], "ratio must be in (0, 1), got 0"),
    (["--method", "prune-taylor"], "leaves none of the model's 2 layers to prune"),
    (["--method", "prune-l1", "--set", "spare_first=0"], "2 query heads per KV head (4 over 2)"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_attack_input_is_refused_and_writes_nothing(planted, tmp_path, cli, argv, fragment):
    folder = planted["utf"][4]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = cli("attack", "--model", folder, "--out", tmp_path / "out", *argv)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_expert_of_another_architecture_is_refused_naming_the_fields(planted, tmp_path, cli):
    tok = tiny_tokenizer()
    wide = tiny_model(tok, hidden=128)
    wide.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    code, _, err = cli("attack", "--method", "merge-task-arithmetic", "--model", planted["utf"][4], "--out",
                       tmp_path / "out", "--set", f"expert={tmp_path / 'wide'}")
    assert code == 2 and "another architecture" in err and "hidden_size" in err
    assert not (tmp_path / "out").exists()


def test_meraser_attack_writes_its_recovery_rows_with_the_model_before_the_erase(planted, tmp_path, monkeypatch):
    """Rows the model writes or answers itself (the default Magpie share, self-answers) must come from the model as
    the attacker received it: the erase, merged into the same model, takes its short answers away."""
    import torch

    from meraser.attacks import get_attack
    from meraser.erase.datasets import CleanSet

    folder = planted["utf"][4]
    model, tok = load_model(str(folder / "model"))
    received = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    seen = []
    build = CleanSet.build

    def spy(self, exclude, writer=None, *args, **kw):
        seen.append(writer.model.layers[0].self_attn.q_proj.weight.detach().clone())
        return build(self, exclude, writer, *args, **kw)

    monkeypatch.setattr(CleanSet, "build", spy)
    attack = get_attack("meraser")
    cfg = attack.Config.from_dict(tiny_settings(write_pool(tmp_path / "pool.jsonl", POOL))["meraser"])
    out = apply_attack(attack, model, tok, cfg, AttackContext(str(folder), None, tmp_path / "work", progress=False))
    assert len(seen) == 1 and torch.equal(seen[0], received)  # the writer had the received weights
    assert not torch.equal(out.model.layers[0].self_attn.q_proj.weight, received)  # q_proj: erased and recovered


def test_meraser_cycles_repeats_meraser_on_fresh_rows(planted, tmp_path):
    """One cycle is exactly `meraser`; a second erases and recovers that model again, on rows drawn with the next
    seed (the same rows again would only train the same pairs further)."""
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    settings = tiny_settings(pool)["meraser"]
    model, tok = planted["utf"][0], planted["utf"][1]

    def run(name, work, **extra):
        attack = get_attack(name)
        ctx = AttackContext(str(planted["utf"][4]), None, tmp_path / work, progress=False)
        out = apply_attack(attack, copy.deepcopy(model), tok, attack.Config.from_dict({**settings, **extra}), ctx)
        return out.state_dict(), ctx.info

    once, _ = run("meraser", "a")
    one_cycle, info1 = run("meraser-cycles", "b", cycles=1)
    two_cycles, info2 = run("meraser-cycles", "c", cycles=2)
    assert all(torch.equal(once[k], one_cycle[k]) for k in once)
    assert info1["cycles"] == 1 and info2["cycles"] == 2 and len(info2["steps_per_cycle"]) == 2
    assert any(not torch.equal(once[k], two_cycles[k]) for k in once)
    from meraser.attacks.meraser import CyclesConfig
    from meraser.utils import MeraserError

    with pytest.raises(MeraserError, match="cycles: 0 is not a number of passes"):
        CyclesConfig.from_dict({"cycles": 0})
