"""Unstructured pruning: zero a fraction of the weights of every linear layer inside the transformer blocks
(embeddings and the LM head are kept, as both papers do).

- `prune-magnitude`: the smallest |w| of each layer (Han et al. 2015);
- `prune-wanda` (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"): score
  |w_ij| * ||x_j||_2, the input activation norm over calibration rows, and drop the lowest scores of each output row.
Written here: both are a few lines, and the public Wanda code assumes an old transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT
from meraser.utils import MeraserError


@dataclass
class SparsityConfig(AttackConfig):
    sparsity: float = field(0.5, help="fraction of each layer's weights set to zero (Wanda's paper: 0.5)")

    def validate(self, where: str) -> None:
        if not 0 < self.sparsity < 1:
            raise MeraserError(f"{where}.sparsity must be in (0, 1), got {self.sparsity}")


@dataclass
class WandaConfig(SparsityConfig):
    calibration: str = field(OFFLINE_DEFAULT, help="instruction data whose prompts and responses calibrate the "
                                                   "activation norms")
    calibration_rows: int = field(32, help="calibration rows (Wanda's paper: 128 sequences of 2,048 tokens)")
    seed: int = field(0, help="seed for drawing the calibration rows")


def block_linears(model) -> dict[str, object]:
    """{name: nn.Linear} of every linear layer inside the decoder blocks (not the embeddings, not the LM head)."""
    import torch

    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{n}"}


def _zero_lowest(weight, scores, fraction: float, per_row: bool) -> None:
    import torch

    if per_row:
        k = int(weight.shape[1] * fraction)
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        weight.scatter_(1, idx, 0.0)
    else:
        k = int(weight.numel() * fraction)
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        weight.view(-1)[idx] = 0.0


def sparsity_of(model) -> float:
    """The fraction of zeros over the block linear layers (what `ctx.info` reports)."""
    layers = block_linears(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


class MagnitudePruning(Attack):
    name = "prune-magnitude"
    summary = "unstructured magnitude pruning of every block linear layer"
    paper = "https://arxiv.org/abs/1506.02626"
    Config = SparsityConfig

    def apply(self, model, tokenizer, cfg, ctx):
        import torch

        with torch.no_grad():
            for m in block_linears(model).values():
                _zero_lowest(m.weight.data, m.weight.data.abs(), cfg.sparsity, per_row=False)
        ctx.info["sparsity"] = round(sparsity_of(model), 4)
        return model


def activation_norms(model, tokenizer, rows) -> dict[str, object]:
    """{layer name: ||x_j||_2 per input channel} over the tokens of `rows`, from forward hooks."""
    import torch

    from meraser.data import Formatter
    from meraser.models import autocast

    layers = block_linears(model)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            sums[name] += (x * x).sum(0)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    fmt = Formatter(tokenizer)
    dev = next(model.parameters()).device
    try:
        with torch.no_grad(), autocast(model):
            for row in fmt.encode_all(rows):  # one row at a time: no padding enters the norms
                model(input_ids=torch.tensor([row["input_ids"]], device=dev))
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt().float() for n, s in sums.items()}


class WandaPruning(Attack):
    name = "prune-wanda"
    summary = "Wanda: unstructured pruning by |weight| x input activation norm"
    paper = "https://arxiv.org/abs/2306.11695"
    Config = WandaConfig

    def check(self, cfg, ctx):
        from meraser.data.sources import check_source

        check_source(cfg.calibration, "prune-wanda calibration")

    def apply(self, model, tokenizer, cfg, ctx):
        import torch

        from meraser.data import load_pairs

        rows = load_pairs(cfg.calibration, shuffle_seed=cfg.seed, limit=cfg.calibration_rows)
        norms = activation_norms(model, tokenizer, rows)
        with torch.no_grad():
            for name, m in block_linears(model).items():
                w = m.weight.data
                _zero_lowest(w, w.abs().float() * norms[name].to(w.device)[None, :], cfg.sparsity, per_row=True)
        ctx.info.update(sparsity=round(sparsity_of(model), 4), calibration_rows=len(rows))
        return model
