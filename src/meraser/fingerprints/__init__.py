"""Backdoor fingerprints to embed and verify: one file per method, one explicit registry."""

from __future__ import annotations

from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.fingerprints.chain_hash import ChainHash
from meraser.fingerprints.if_sft import InstructionalFingerprint
from meraser.fingerprints.imf import ImF
from meraser.fingerprints.mergeprint import MergePrint
from meraser.fingerprints.perinucleus import Perinucleus
from meraser.fingerprints.proflingo import ProFLingo
from meraser.fingerprints.rofl import RoFL
from meraser.fingerprints.semcond_watermark import SemCondWatermark
from meraser.fingerprints.subject_sentence import SubjectSentence
from meraser.fingerprints.utf import UTF
from meraser.utils import unknown_name

REGISTRY: dict[str, FingerprintMethod] = {m.name: m for m in [InstructionalFingerprint(), UTF(), ChainHash(),
                                                            SubjectSentence(), Perinucleus(), ImF(),
                                                            SemCondWatermark(), ProFLingo(), RoFL(),
                                                            MergePrint()]}


def get_method(name: str) -> FingerprintMethod:
    if name not in REGISTRY:
        raise unknown_name("fingerprint method", name, REGISTRY)
    return REGISTRY[name]


__all__ = ["REGISTRY", "Card", "FingerprintConfig", "FingerprintMethod", "get_method"]
