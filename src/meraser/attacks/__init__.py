"""Erasure attacks against fingerprinted models: one file per family, one explicit registry.

Weight-space attacks return a changed model: incremental fine-tuning (finetune.py), unstructured pruning
(sparsity.py), structured LLM-Pruner pruning (structured.py), model merging (merge.py), MEraser itself
(meraser.py), so a comparison treats it like any other, and find-and-unlearn (find_unlearn.py), which finds what the
suspect over-knows against its base without the card and distils the base there.
Decoding-time attacks change how tokens are chosen instead: CleanGen and Token Forcing (decoding.py), and the
adaptive suite of Nasery et al. 2025, which knows the scheme but not the key: output suppression and detection
(suppression.py: top-k, top-k over a confidence threshold, neighbours, lookahead), bigram suppression (bigram.py)
and perplexity filtering of prompts (perplexity_filter.py); and the ImF paper's generation-revision intervention
(gri.py), a standard-answer system prompt and a revision pass.
"""

from __future__ import annotations

from meraser.attacks.base import Attack, AttackConfig, AttackContext, run_attack
from meraser.attacks.bigram import SuppressBigram
from meraser.attacks.decoding import CleanGen, TokenForcing
from meraser.attacks.find_unlearn import FindUnlearn
from meraser.attacks.finetune import FineTune
from meraser.attacks.gri import GRI, GRISystem
from meraser.attacks.meraser import MEraser, MEraserCycles, MEraserErase, MEraserTransfer
from meraser.attacks.merge import Dare, TaskArithmetic, Ties
from meraser.attacks.perplexity_filter import PerplexityFilter
from meraser.attacks.sparsity import MagnitudePruning, WandaPruning
from meraser.attacks.structured import L1Pruning, L2Pruning, RandomPruning, TaylorPruning
from meraser.attacks.suppression import DetectTopK, SuppressLookahead, SuppressNeighbour, SuppressTopK
from meraser.utils import unknown_name

REGISTRY: dict[str, Attack] = {a.name: a for a in [
    MEraser(), MEraserErase(), MEraserCycles(), MEraserTransfer(), FineTune(), L1Pruning(), L2Pruning(), RandomPruning(), TaylorPruning(),
    MagnitudePruning(), WandaPruning(), TaskArithmetic(), Ties(), Dare(), CleanGen(), TokenForcing(),
    SuppressTopK(), DetectTopK(), SuppressNeighbour(), SuppressLookahead(), SuppressBigram(), PerplexityFilter(),
    FindUnlearn(), GRI(), GRISystem(),
]}


def get_attack(name: str) -> Attack:
    if name not in REGISTRY:
        raise unknown_name("attack", name, REGISTRY)
    return REGISTRY[name]


__all__ = ["REGISTRY", "Attack", "AttackConfig", "AttackContext", "get_attack", "run_attack"]
