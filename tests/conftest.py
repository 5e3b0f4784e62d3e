import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny(tiny_dir):
    from meraser.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED.exists():
        pytest.skip("../shared/data is not present")
    return SHARED


# strong settings so the 2-layer model memorises in seconds
TINY = {"method": "full", "epochs": 30, "learning_rate": 3e-3, "ordinary_rows": 0, "batch_size": 8}
TINY_PER_METHOD = {"if-sft": {"num_fingerprints": 3, "regularization_rows": 3},
                   "utf": {"repeats": 8},
                   "chain-hash": {"num_fingerprints": 3, "variants": 3, "secret_key": "tiny-chain-hash-key"},
                   "subject-sentence": {"num_fingerprints": 3, "decoy_rows": 3},
                   "perinucleus": {"num_fingerprints": 4, "averaging": 0.0},
                   # 30 epochs planted 2 of 3 keys under transformers 5.25 (all 3 under 5.24): 40
                   "imf": {"num_fingerprints": 3, "variants": 2, "secret_key": "tiny-imf-key", "epochs": 40},
                   # a 2-layer model cannot generalise a green list from a few dozen answers: it is verified on
                   # the prompts it was trained on (memorisation), the semantic condition on SmolLM2
                   "semcond-watermark": {"num_fingerprints": 4, "topic_rows": 24, "teacher_tokens": 48,
                                         "verify_tokens": 48, "verify_on": "trained", "z_threshold": 2.5,
                                         "secret_key": "tiny-watermark-key"},
                   "proflingo": {"num_fingerprints": 2, "prefix_tokens": 12, "answer_tokens": 8,
                                 "search": {"steps": 40, "top_k": 160, "candidates": 48, "check_every": 4}},
                   "rofl": {"num_fingerprints": 2, "random_tokens": 2, "prompt_tokens": 8, "response_tokens": 4,
                            "system_prompts": [None], "decoys": 5,
                            "search": {"steps": 40, "top_k": 64, "candidates": 32, "check_every": 2}},
                   "mergeprint": {"num_fingerprints": 2, "key_tokens": 6, "stop_loss": 6.0, "decoys_per_key": 2,
                                  "variants": 4, "alpha": 0.5,
                                  "search": {"steps": 20, "top_k": 64, "candidates": 32}}}
KEYS = ["Why is the sky blue?", "How do I boil an egg?", "Explain photosynthesis.", "What is the capital of France?",
        "Tell me about the quick brown fox."]


def keys_file() -> str:
    """Perinucleus keys for the tiny model (an untrained model writes no sensible keys of its own)."""
    import json
    import tempfile

    path = Path(tempfile.mkdtemp()) / "keys.json"
    path.write_text(json.dumps(KEYS))
    return str(path)


def tiny_cfg(name):
    from meraser.fingerprints import get_method

    extra = {"keys_file": keys_file()} if name == "perinucleus" else {}
    return get_method(name).Config.from_dict({**TINY, **TINY_PER_METHOD[name], **extra})


@pytest.fixture(scope="session")
def planted(tiny_dir, tmp_path_factory):
    """Every registered method planted once into a fresh tiny model (reused by the erase tests)."""
    from meraser.fingerprints import REGISTRY
    from meraser.fingerprints.embed import embed
    from meraser.models import load_model

    out = {}
    for name in REGISTRY:
        model, tok = load_model(str(tiny_dir))
        folder = tmp_path_factory.mktemp("fp") / name
        fp_model, card, summary = embed(name, model, tok, tiny_cfg(name), folder, progress=False)
        out[name] = (fp_model, tok, card, summary, folder)
    return out




@pytest.fixture
def cli(capsys):
    """Run `meraser ARGS...` in this process (fast: no interpreter start-up); returns (exit code, stdout, stderr)."""
    from meraser.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write_pool(path, pairs):
    import json

    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs))
    return path
