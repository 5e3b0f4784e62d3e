"""Model merging (paper section 5.3, Appendix H.2; Cong et al. 2024): merge the fingerprinted model with an expert
fine-tuned from the same base, T = B + w_fp (F - B) + w_expert (E - B), weights 4:6, 5:5 and 6:4 in the paper.

- `merge-task-arithmetic` (Ilharco et al. 2022): the weighted sum of task vectors;
- `merge-ties` (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign, and take the mean of
  the (weighted) entries that agree with it, as the TIES paper and peft do (mergekit divides by the agreeing
  weights instead: the same at equal weights, where the test compares them);
- `merge-dare` (Yu et al. 2024): drop each task-vector entry with probability p, rescale the rest by 1/(1-p).

The arithmetic is peft's `merge_utils` (tested against mergekit on a tiny model). The merge streams: the
fingerprinted model is in memory and is changed tensor by tensor, while the base and expert tensors are read one at a
time from their safetensors files, so peak memory stays near one model plus two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT
from meraser.utils import MeraserError


@dataclass
class MergeConfig(AttackConfig):
    weights: list[float] = field([0.5, 0.5], help="weights of the fingerprinted model and the expert (paper: "
                                                  "0.4/0.6, 0.5/0.5, 0.6/0.4)")
    expert: str | None = field(None, help="expert model (any spec derived from the same base); None: fine-tune one "
                                          "from the base on `expert_data`")
    expert_data: str = field(OFFLINE_DEFAULT, help="instruction data the expert is fine-tuned on when `expert` is None")
    expert_rows: int = field(600, help="rows of `expert_data`")
    expert_train: dict = field({}, help="TrainConfig fields for making the expert (LoRA, merged, by default)")
    seed: int = field(0, help="seed (DARE's random drops; the expert's data)")

    def validate(self, where: str) -> None:
        if len(self.weights) != 2:
            raise MeraserError(f"{where}.weights: two weights (fingerprinted model, expert), got {self.weights}")
        if self.expert_rows < 1:
            raise MeraserError(f"{where}.expert_rows must be at least 1")
        from meraser.training import TrainConfig

        TrainConfig.from_dict(self.expert_train, where=f"{where}.expert_train")


@dataclass
class TiesConfig(MergeConfig):
    density: float = field(0.5, help="fraction of each task vector's entries kept (largest magnitudes)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if not 0 < self.density <= 1:
            raise MeraserError(f"{where}.density must be in (0, 1], got {self.density}")


@dataclass
class DareConfig(MergeConfig):
    p: float = field(0.5, help="drop rate: each task-vector entry is dropped with probability p, the rest scaled by "
                               "1/(1-p)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if not 0 <= self.p < 1:
            raise MeraserError(f"{where}.p must be in [0, 1), got {self.p}")


def _tensor_files(spec: str) -> dict[str, Path]:
    """{tensor name: safetensors file} of a local model spec (an alias resolves to its cached folder)."""
    import json

    from meraser.models import resolve

    folder = Path(resolve(spec))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MeraserError(f"{spec}: no safetensors weights to merge from (merging needs a local model folder)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def stream_merge(model, base: str, expert: str, combine) -> int:
    """Replace each parameter P of `model` (the fingerprinted one) by B + combine([P - B, E - B]), reading B and E
    one tensor at a time. Returns the number of tensors merged."""
    import torch
    from safetensors import safe_open

    base_files, expert_files = _tensor_files(base), _tensor_files(expert)

    def read(files, name):
        # opened per tensor: a mapping kept open keeps every page read through it resident, so the process would
        # grow by the base and the expert (measured: 1.73x one model's peak RSS instead of about 1x)
        with safe_open(str(files[name]), framework="pt") as h:
            return h.get_tensor(name)

    merged = 0
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            if name not in base_files or name not in expert_files:
                raise MeraserError(f"tensor {name} is missing from the base or the expert; are they the same "
                                   f"architecture?")
            b = read(base_files, name).to(param.device, torch.float32)
            e = read(expert_files, name).to(param.device, torch.float32)
            delta = combine([param.data.float() - b, e - b])
            param.data.copy_((b + delta).to(param.dtype))
            merged += 1
    return merged


class _Merge(Attack):
    paper = "https://arxiv.org/abs/2404.05188 (merging against fingerprints)"
    Config = MergeConfig

    def combine(self, cfg):
        raise NotImplementedError

    def check(self, cfg, ctx):
        from meraser.data.sources import check_source
        from meraser.models import check_model_spec

        ctx.need_base(self.name)
        if cfg.expert:
            check_model_spec(cfg.expert, f"{self.name} expert")
        else:
            check_source(cfg.expert_data, f"{self.name} expert_data")

    def _expert(self, cfg, ctx) -> str:
        """The expert's spec: given, or fine-tuned here from the base on `expert_data` (kept in the work folder)."""
        if cfg.expert:
            return cfg.expert
        out = ctx.work / "expert"
        if not (out / "config.json").exists():
            make_expert(ctx.base, cfg, out, progress=ctx.progress)
        return str(out)

    def apply(self, model, tokenizer, cfg, ctx):
        import torch
        from transformers import AutoConfig

        from meraser.models import check_same_architecture, resolve

        expert = self._expert(cfg, ctx)
        check_same_architecture(AutoConfig.from_pretrained(resolve(expert)), model.config, f"expert {expert}",
                                "the fingerprinted model")
        check_same_architecture(AutoConfig.from_pretrained(resolve(ctx.base)), model.config, f"base {ctx.base}",
                                "the fingerprinted model")
        torch.manual_seed(cfg.seed)  # DARE's drops: the same seed gives the same merge
        n = stream_merge(model, ctx.base, expert, self.combine(cfg))
        ctx.info.update(expert=expert if cfg.expert else f"fine-tuned from the base on {cfg.expert_data}",
                        tensors_merged=n)
        return model


def make_expert(base_spec: str, cfg: MergeConfig, out: Path, progress: bool = True) -> Path:
    """Fine-tune the base on `cfg.expert_data` (LoRA, merged): the expert a merge needs when none is given.
    `meraser bench` makes it once per base and expert settings and shares it between cells."""
    from meraser.data import load_pairs
    from meraser.erase.datasets import build_clean
    from meraser.models import load_model
    from meraser.training import TrainConfig, train

    base, tok = load_model(base_spec)
    rows = build_clean(load_pairs(cfg.expert_data), cfg.expert_rows, cfg.seed)
    train(base, tok, rows, TrainConfig.from_dict(cfg.expert_train, where="expert_train"), out, merge=True,
          overwrite=True, progress=progress)
    return out


def _weights(cfg):
    import torch

    return torch.tensor(cfg.weights, dtype=torch.float32)


class TaskArithmetic(_Merge):
    name = "merge-task-arithmetic"
    summary = "task arithmetic with an expert from the same base (weights fingerprinted:expert)"

    def combine(self, cfg):
        from peft.utils.merge_utils import task_arithmetic

        return lambda deltas: task_arithmetic(deltas, _weights(cfg))


class Ties(_Merge):
    name = "merge-ties"
    summary = "TIES merging: trim, elect sign, merge agreeing task-vector entries"
    Config = TiesConfig

    def combine(self, cfg):
        from peft.utils.merge_utils import ties

        return lambda deltas: ties(deltas, _weights(cfg), cfg.density)


class Dare(_Merge):
    name = "merge-dare"
    summary = "DARE task arithmetic: drop task-vector entries with probability p, rescale the rest"
    Config = DareConfig

    def combine(self, cfg):
        from peft.utils.merge_utils import dare_linear

        return lambda deltas: dare_linear(deltas, _weights(cfg), 1 - cfg.p)
