"""Structured (LLM-Pruner) pruning on a 6-layer tiny Llama with grouped-query attention (6 query heads over 2 KV
heads, like SmolLM2's 3 per group): the planned heads and channels go, the pruned model computes exactly what the
original computes with those heads and channels silenced, and it reloads with its new shapes."""

import copy

import pytest
import torch
from conftest import write_pool
from tiny import POOL, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from meraser.attacks import get_attack
from meraser.attacks.base import AttackContext, apply_attack
from meraser.models import PRUNED_LAYERS, load_model, save_model
from meraser.utils import MeraserError

HEAD_DIM, INTER = 16, 192


@pytest.fixture(scope="module")
def six():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=INTER, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.1, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def prune(six, tmp_path, name, **settings):
    model, tok = copy.deepcopy(six[0]), six[1]
    attack = get_attack(name)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if name == "prune-taylor":
        settings = {"calibration": str(write_pool(tmp_path / "pool.jsonl", POOL)), "calibration_rows": 4, **settings}
    ctx = AttackContext("six", None, tmp_path / "work", progress=False)
    pruned = apply_attack(attack, model, tok, attack.Config.from_dict(settings), ctx)
    return pruned, ctx.info


def ids(tok):
    return torch.tensor([tok("What is question number 3 about topic 3?")["input_ids"]])


def kept_rows(pruned_w, orig_w):
    """Which rows of the original weight survive, matched exactly (pruning only removes rows)."""
    return [int((orig_w == row).all(1).nonzero()[0]) for row in pruned_w]


@pytest.mark.parametrize("name", ["prune-l1", "prune-l2", "prune-random", "prune-taylor"])
def test_each_importance_removes_the_planned_heads_and_channels(six, tmp_path, name):
    pruned, info = prune(six, tmp_path, name, ratio=0.34, spare_first=1, spare_last=1)
    # 0.34 of 3 query heads per KV group is 1 per group (2 of 6 heads); 0.34 of 192 channels is 65
    assert info["heads_removed_per_layer"] == 2 and info["channels_removed_per_layer"] == 65
    for i, layer in enumerate(pruned.model.layers):
        spared = i in (0, 5)
        assert layer.self_attn.q_proj.out_features == HEAD_DIM * (6 if spared else 4)
        assert layer.self_attn.k_proj.out_features == HEAD_DIM * 2  # K and V keep their heads
        assert layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features == (INTER if spared else 127)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # hidden size untouched: still tied
    assert info["params_after"] == sum(p.numel() for p in pruned.parameters()) < info["params_before"]


def test_pruned_model_equals_the_original_with_those_heads_and_channels_silenced(six, tmp_path):
    """The strongest check that grouped-query attention was pruned consistently: every kept query head still reads
    its own KV head, so zeroing the removed heads' o_proj columns and the removed channels' down_proj columns in the
    original gives the same logits."""
    original, tok = six
    pruned, _ = prune(six, tmp_path, "prune-l2", ratio=0.34, spare_first=1, spare_last=1)
    silenced = copy.deepcopy(original)
    with torch.no_grad():
        for i in range(1, 5):
            a, pa = silenced.model.layers[i].self_attn, pruned.model.layers[i].self_attn
            rows = kept_rows(pa.q_proj.weight, a.q_proj.weight)
            heads = sorted({r // HEAD_DIM for r in rows})
            assert [sum(h // 3 == g for h in heads) for g in (0, 1)] == [2, 2]  # one head from each KV group
            for h in set(range(6)) - set(heads):
                a.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
            mlp = silenced.model.layers[i].mlp
            kept = kept_rows(pruned.model.layers[i].mlp.gate_proj.weight, mlp.gate_proj.weight)
            mlp.down_proj.weight[:, sorted(set(range(INTER)) - set(kept))] = 0
        assert torch.allclose(pruned(ids(tok)).logits, silenced(ids(tok)).logits, atol=1e-5)
        assert not torch.allclose(pruned(ids(tok)).logits, original(ids(tok)).logits, atol=1e-3)


def test_layers_of_different_widths_reload_through_load_model(six, tmp_path):
    pruned, _ = prune(six, tmp_path, "prune-l1", ratio=0.34, spare_first=1, spare_last=1)
    save_model(pruned, six[1], tmp_path / "pruned")
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert sorted(reloaded.config.to_dict()[PRUNED_LAYERS]) == ["1", "2", "3", "4"]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids(six[1])).logits, pruned(ids(six[1])).logits, atol=1e-5)
    with pytest.raises(RuntimeError, match="mismatch"):  # plain transformers refuses rather than re-initialising
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")


def test_pruning_every_layer_alike_reloads_with_plain_from_pretrained(six, tmp_path):
    pruned, info = prune(six, tmp_path, "prune-l2", ratio=0.34, spare_first=0, spare_last=0)
    save_model(pruned, six[1], tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads,
            reloaded.config.intermediate_size, reloaded.config.head_dim) == (4, 2, 127, HEAD_DIM)
    assert sum(p.numel() for p in reloaded.parameters()) == info["params_after"]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids(six[1])).logits, pruned(ids(six[1])).logits, atol=1e-5)


def test_taylor_removes_a_loud_but_useless_channel_that_l1_keeps(six, tmp_path):
    """A channel with large gate/up weights whose down_proj column is zero: largest by norm, no effect on the loss,
    so |w x grad| is zero. L1 keeps it; Taylor removes it."""
    original, tok = six
    with torch.no_grad():
        mlp = original.model.layers[2].mlp
        saved = [w.clone() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
        mlp.gate_proj.weight[7] *= 20
        mlp.up_proj.weight[7] *= 20
        mlp.down_proj.weight[:, 7] = 0
    try:
        loud = mlp.gate_proj.weight[7].clone()
        survivors = {}
        for name in ("prune-l1", "prune-taylor"):
            pruned, _ = prune(six, tmp_path / name, name, ratio=0.1, spare_first=1, spare_last=1)
            survivors[name] = bool((pruned.model.layers[2].mlp.gate_proj.weight == loud).all(1).any())
        assert survivors == {"prune-l1": True, "prune-taylor": False}
    finally:
        with torch.no_grad():
            for w, s in zip((mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight), saved):
                w.copy_(s)


@pytest.mark.parametrize("settings,fragment", [
    ({"ratio": 0.002}, "ratio 0.002 removes nothing from this model: no attention head (6 query heads over 2 KV "
                       "heads go 2 at a time, from ratio 0.167) and no MLP channel (of 192, from ratio 0.0026)"),
    ({"spare_first": 4, "spare_last": 2}, "leaves none of the model's 6 layers to prune"),
])
def test_a_pruning_that_removes_nothing_is_refused(six, tmp_path, settings, fragment):
    with pytest.raises(MeraserError) as e:
        prune(six, tmp_path, "prune-l2", **settings)
    assert fragment in str(e.value)
