"""Structured pruning as LLM-Pruner does it (Ma et al. 2023, block-wise mode): remove whole attention heads and MLP
channels inside a range of decoder layers, ranked by an importance, with torch-pruning's dependency graph keeping
q/k/v/o and gate/up/down consistent.

- `prune-l1`, `prune-l2`: the L1 / L2 norm of each coupled group of weights (paper ratio 5%);
- `prune-random`: random ranks (20%);
- `prune-taylor`: |w x dL/dw| summed over the group, gradients from a few calibration rows (20%).

What torch-pruning needs to get right on Llama-family models, learned the hard way (torch-pruning issue 516):
- under SDPA attention without a mask transformers skips `repeat_kv`, so grouped-query attention is invisible to the
  tracer and pruning crashes; the graph is built under eager attention with `use_cache=False`;
- with grouped-query attention query heads go per KV group (the same number from each, K and V stay whole), so on
  SmolLM2 (9 query heads over 3 KV heads) only multiples of 1/3 of the heads can go: the ratio is rounded to the
  nearest count per group, the heads actually removed are reported, and a ratio that removes nothing is refused;
- with exactly 2 query heads per KV head torch-pruning 1.6.1 loops forever building its graph (3, 4 or more per
  head, and plain multi-head attention, are fine): such models are refused up front;
- the hidden size is left alone (block-wise mode does not touch it), so the embeddings stay tied and RoPE intact.

Sparing layers (LLM-Pruner's default prunes layers 3-30 of 32) gives layers of different widths, which a Llama
config cannot express; the widths are then recorded in config.json (`models.PRUNED_LAYERS`) and `models.load_model`
rebuilds them. With `spare_first=0 spare_last=0` every layer loses the same heads and channels, the config is
updated instead, and plain `AutoModelForCausalLM.from_pretrained` loads the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT
from meraser.utils import MeraserError


@dataclass
class StructuredConfig(AttackConfig):
    ratio: float = field(0.05, help="fraction of the heads and MLP channels of each pruned layer to remove (paper: "
                                    "5% for L1/L2, 20% for random/Taylor); heads round to whole heads per KV group")
    spare_first: int = field(3, help="leading decoder layers left whole (LLM-Pruner's default: 3)")
    spare_last: int = field(1, help="trailing decoder layers left whole (LLM-Pruner's default: 1)")

    def validate(self, where: str) -> None:
        if not 0 < self.ratio < 1:
            raise MeraserError(f"{where}.ratio must be in (0, 1), got {self.ratio}")
        for name in ("spare_first", "spare_last"):
            if getattr(self, name) < 0:
                raise MeraserError(f"{where}.{name} must be 0 or more, got {getattr(self, name)}")


@dataclass
class RandomConfig(StructuredConfig):
    ratio: float = field(0.2, help="fraction of the heads and MLP channels of each pruned layer to remove (paper: "
                                   "20%); heads round to whole heads per KV group")
    seed: int = field(0, help="seed of the random ranking")


@dataclass
class TaylorConfig(StructuredConfig):
    ratio: float = field(0.2, help="fraction of the heads and MLP channels of each pruned layer to remove (paper: "
                                   "20%); heads round to whole heads per KV group")
    calibration: str = field(OFFLINE_DEFAULT, help="instruction data whose rows give the gradients")
    calibration_rows: int = field(10, help="calibration rows (LLM-Pruner: 10 examples)")
    seed: int = field(0, help="seed for drawing the calibration rows")


@dataclass
class PrunePlan:
    """How many heads and channels go from each pruned layer, decided from the config before any work."""

    layers: list[int]
    heads: int  # query heads per layer
    kv_heads: int
    heads_removed: int  # query heads removed per pruned layer
    intermediate: int  # MLP channels per layer
    channels_removed: int

    @property
    def head_ratio(self) -> float:
        """The head ratio to hand torch-pruning so that it removes exactly `heads_removed` (it rounds up twice:
        ceil(ratio x heads), then per KV group)."""
        return max(self.heads_removed - 0.5, 0) / self.heads

    @property
    def channel_ratio(self) -> float:
        """Likewise for channels: torch-pruning keeps int(width x (1 - ratio)), rounding the removed count up."""
        return max(self.channels_removed - 0.5, 0) / self.intermediate


def plan_pruning(config, cfg: StructuredConfig, where: str) -> PrunePlan:
    """Refuse a layer range or ratio that removes nothing, naming the smallest ratio that would."""
    n = config.num_hidden_layers
    layers = list(range(cfg.spare_first, n - cfg.spare_last))
    if not layers:
        raise MeraserError(f"{where}: spare_first={cfg.spare_first} + spare_last={cfg.spare_last} leaves none of the "
                           f"model's {n} layers to prune")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv  # 1 without grouped-query attention: heads then go one by one
    if per_group == 2:
        raise MeraserError(
            f"{where}: torch-pruning never finishes building the dependency graph of grouped-query attention with 2 "
            f"query heads per KV head ({heads} over {kv}): it loops in _fix_dependency_graph_non_recursive (measured "
            f"with torch-pruning 1.6.1; its issue 527 reports the same loop on Qwen3); use prune-magnitude or "
            f"prune-wanda on this model")
    unit = 1 if per_group == 1 else kv  # heads removed in one step
    steps = heads // unit if per_group == 1 else per_group
    removed_steps = min(int(cfg.ratio * steps + 0.5), steps - 1)  # nearest count; one head per group stays
    inter = config.intermediate_size
    channels = min(int(cfg.ratio * inter + 0.5), inter - 1)
    if removed_steps == 0 and channels == 0:
        raise MeraserError(
            f"{where}: ratio {cfg.ratio} removes nothing from this model: no attention head ({heads} query heads over "
            f"{kv} KV heads go {unit} at a time, from ratio {0.5 / steps:.3g}) and no MLP channel (of {inter}, from "
            f"ratio {0.5 / inter:.2g})")
    return PrunePlan(layers, heads, kv, removed_steps * unit, inter, channels)


def _check_llama_layout(model) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
    try:
        for name in needed:
            layers[0].get_submodule(name)
    except (AttributeError, TypeError):
        raise MeraserError(f"structured pruning supports Llama-family layouts ({', '.join(needed)} in "
                           f"model.layers); {type(model).__name__} differs") from None


class StructuredPruning(Attack):
    """The four LLM-Pruner importances share everything but the ranking."""

    Config = StructuredConfig

    def check(self, cfg, ctx):
        from meraser.models import meta_model

        # refuse before loading any weights; in an experiment the fingerprinted model may not exist yet, and it has
        # its base's layout
        spec = ctx.model_spec if Path(ctx.model_spec).exists() else ctx.base
        skeleton = meta_model(spec) if spec else None
        if skeleton is not None:
            _check_llama_layout(skeleton)
            plan_pruning(skeleton.config, cfg, self.name)

    def importance(self, model, tokenizer, cfg):
        raise NotImplementedError

    def apply(self, model, tokenizer, cfg, ctx):
        _check_llama_layout(model)
        plan = plan_pruning(model.config, cfg, self.name)
        before = sum(p.numel() for p in model.parameters())
        attn = model.config._attn_implementation
        model.set_attn_implementation("eager")  # makes repeat_kv, and with it grouped-query attention, traceable
        try:
            prune_structured(model, tokenizer, plan, self.importance(model, tokenizer, cfg))
        finally:
            model.set_attn_implementation(attn)
        record_widths(model, plan)
        after = sum(p.numel() for p in model.parameters())
        ctx.info.update(layers_pruned=f"{plan.layers[0]}-{plan.layers[-1]}", heads_removed_per_layer=plan.heads_removed,
                        heads_left=plan.heads - plan.heads_removed, channels_removed_per_layer=plan.channels_removed,
                        channels_left=plan.intermediate - plan.channels_removed, params_before=before,
                        params_after=after, params_removed=round(1 - after / before, 4))
        return model


def prune_structured(model, tokenizer, plan: PrunePlan, importance) -> None:
    """Run torch-pruning over the planned layers: heads (whole, per KV group) and MLP channels; the hidden size, the
    embeddings, the LM head and the spared layers are left out of every group."""
    import torch
    import torch_pruning as tp

    layers = model.model.layers
    ignored = [model.get_input_embeddings(), model.get_output_embeddings()]
    num_heads, norms = {}, []
    for i, layer in enumerate(layers):
        a = layer.self_attn
        ignored += [a.o_proj, layer.mlp.down_proj] if i in plan.layers else [layer]  # o/down roots = hidden size
        num_heads.update({a.q_proj: plan.heads, a.k_proj: plan.kv_heads, a.v_proj: plan.kv_heads})
    norms = [m.weight for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    example = torch.tensor([tokenizer("Structured pruning traces the model once.")["input_ids"]],
                           device=next(model.parameters()).device)
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=importance, pruning_ratio=plan.channel_ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=plan.heads_removed > 0, prune_head_dims=False,
        head_pruning_ratio=plan.head_ratio, unwrapped_parameters=[(w, 0) for w in norms],
        forward_fn=lambda m, ids: m(input_ids=ids, use_cache=False).logits)
    pruner.step()
    for i in plan.layers:  # torch-pruning reshapes the weights; the modules' own counts follow
        a = layers[i].self_attn
        a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
    model.zero_grad(set_to_none=True)


def record_widths(model, plan: PrunePlan) -> None:
    """Write the new widths into the config: its own fields when every layer was pruned alike, else per layer."""
    from meraser.models import PRUNED_LAYERS

    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    widths = {str(i): {"num_attention_heads": layers[i].self_attn.q_proj.out_features // head_dim,
                       "num_key_value_heads": layers[i].self_attn.k_proj.out_features // head_dim,
                       "intermediate_size": layers[i].mlp.gate_proj.out_features} for i in plan.layers}
    if len(plan.layers) == len(layers):
        model.config.head_dim = head_dim  # else Llama derives it from hidden_size / num_attention_heads
        for key, value in widths["0"].items():
            setattr(model.config, key, value)
    else:
        setattr(model.config, PRUNED_LAYERS, widths)


class L1Pruning(StructuredPruning):
    name = "prune-l1"
    summary = "LLM-Pruner structured pruning of heads and MLP channels by L1 weight norm"
    paper = "https://arxiv.org/abs/2305.11627"

    def importance(self, model, tokenizer, cfg):
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=1)


class L2Pruning(L1Pruning):
    name = "prune-l2"
    summary = "LLM-Pruner structured pruning of heads and MLP channels by L2 weight norm"

    def importance(self, model, tokenizer, cfg):
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=2)


class RandomPruning(L1Pruning):
    name = "prune-random"
    summary = "structured pruning of randomly chosen heads and MLP channels (LLM-Pruner's control)"
    Config = RandomConfig

    def importance(self, model, tokenizer, cfg):
        import torch
        import torch_pruning as tp

        torch.manual_seed(cfg.seed)  # RandomImportance draws from torch's global generator
        return tp.importance.RandomImportance()


class TaylorPruning(L1Pruning):
    name = "prune-taylor"
    summary = "LLM-Pruner structured pruning by first-order Taylor importance |w x grad| on calibration rows"
    Config = TaylorConfig

    def check(self, cfg, ctx):
        from meraser.data.sources import check_source

        check_source(cfg.calibration, "prune-taylor calibration")
        super().check(cfg, ctx)

    def importance(self, model, tokenizer, cfg):
        import torch_pruning as tp

        from meraser.data import load_pairs

        rows = load_pairs(cfg.calibration, shuffle_seed=cfg.seed, limit=cfg.calibration_rows)
        accumulate_gradients(model, tokenizer, rows)
        return tp.importance.GroupTaylorImportance()


def accumulate_gradients(model, tokenizer, rows) -> None:
    """Sum the language-modelling loss gradients of `rows` into the weights' .grad (one row at a time: no padding)."""
    import torch

    from meraser.data import Formatter

    fmt = Formatter(tokenizer)
    dev = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for row in fmt.encode_all(rows):
            ids = torch.tensor([row["input_ids"]], device=dev)
            labels = torch.tensor([row["labels"]], device=dev)
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
