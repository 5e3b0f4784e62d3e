"""`fingerprint`, `card` and `verify`: the owner's side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from meraser import terminal
from meraser.cli.common import (
    MODEL_HELP,
    DecodingAttack,
    DecodingAttackSettings,
    JsonOut,
    Overwrite,
    TrustRemoteCode,
    app,
    config_default,
    parse_sets,
    quiet_libraries,
)
from meraser.models import DEFAULT_MODEL
from meraser.utils import console as _console


def _fingerprint_methods() -> str:
    from meraser.fingerprints import REGISTRY  # light: no torch at import

    return "one of: " + ", ".join(REGISTRY)


def _decoys_default() -> str:
    from meraser.evaluation.likelihood import FEW_DECOYS, MANY_DECOYS

    return f"{FEW_DECOYS} where the card has keys enough for an exact p-value far below the level, else {MANY_DECOYS}"


def _endpoint_default(name: str) -> str:
    from meraser.evaluation.served import EndpointConfig

    return config_default(EndpointConfig, name)


@app.command()
def fingerprint(
    method: str = typer.Option(..., "--method", help=_fingerprint_methods()),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model/ plus the secret fingerprint_card.json"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="method config field, e.g. --set epochs=3; repeat",
                                             show_default="the method's defaults"),
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Embed a backdoor fingerprint (the defender's side) and report FSR and false-positive rate."""
    import json

    from meraser.fingerprints.embed import fingerprint as run

    quiet_libraries()
    s = run(method, model, out, parse_sets(set_), overwrite=overwrite, trust_remote_code=trust_remote_code)
    if json_out:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return
    _console().print(
        f"[green]{method}[/] fingerprint in {out}/model, card {out}/fingerprint_card.json (keep it secret)\n"
        f"FSR {s['fsr']:.1%}  false positives {s['false_positive_rate']:.1%}  "
        f"training {s['train']['seconds']} s on {s['rows']} rows\n"
        f"card checksum (publish it to commit to this card without showing it): {_card_checksum(out)}"
    )


def _card_checksum(folder: Path) -> str:
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import CARD_FILE

    return Card.load(folder / CARD_FILE).checksum


@app.command()
def verify(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (a fingerprint output folder "
                                        "works too)", show_default="none: --endpoint instead"),
    card: Path = typer.Option(..., "--card", help="fingerprint card JSON (or the folder holding it)"),
    attack: DecodingAttack = None,
    set_: DecodingAttackSettings = None,
    reference: Optional[str] = typer.Option(None, "--reference", help="a model known not to carry the fingerprint "
                                            "(e.g. the base): gives the ownership p-value",
                                            show_default="no p-value"),
    test: str = typer.Option("paper", "--test", help="paper (greedy answers must contain the target: FSR), strict "
                             "(forced prefix, sampling, paraphrases, log-likelihood, partial match) or likelihood "
                             "(the card's keys against decoy keys: an ownership p-value without a base model)"),
    strict: bool = typer.Option(False, "--strict", help="the same as --test strict"),
    base: Optional[str] = typer.Option(None, "--base", help="with --test strict or likelihood: the clean base model, "
                                       "compared with beside the suspect", show_default="no comparison"),
    decoys: Optional[int] = typer.Option(None, min=1, help="with --test likelihood: decoy keys per key (fewer "
                                         "where the method has fewer)",
                                         show_default=_decoys_default()),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="a served suspect: its OpenAI-compatible base URL "
                                           "(http://host:port/v1), instead of --model", rich_help_panel="Served model"),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="the model name the server serves",
                                               show_default="the only one it lists", rich_help_panel="Served model"),
    api: Optional[str] = typer.Option(None, "--api", help="chat (the server's template; no prefill) or completions "
                                      "(the prompt rendered here with the owner's tokenizer, prefill included)",
                                      show_default=_endpoint_default("api"), rich_help_panel="Served model"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="the owner's tokenizer (renders prompts, draws "
                                            "probes)", show_default="the card's base model",
                                            rich_help_panel="Served model"),
    concurrency: Optional[int] = typer.Option(None, min=1, help="requests in flight at once",
                                              show_default=_endpoint_default("concurrency"),
                                              rich_help_panel="Served model"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="environment variable holding the API key "
                                              "(never printed)", show_default=_endpoint_default("api_key_env"),
                                              rich_help_panel="Served model"),
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Check a suspect model against a fingerprint card: FSR, false-positive rate, per-trigger outputs; or the strict
    checks, or the likelihood ownership test (--test). A served suspect (--endpoint) gets the checks its API allows."""
    from meraser.evaluation.verifications import verify_suspect

    quiet_libraries()
    test = "strict" if strict else test
    given = {"url": endpoint, "model": served_model, "api": api, "tokenizer": tokenizer, "concurrency": concurrency,
             "api_key_env": api_key_env}
    r = verify_suspect(card, test, model=model,
                       endpoint={k: v for k, v in given.items() if v is not None} if endpoint else None, base=base,
                       reference=reference, decoys=decoys, attack=attack, attack_settings=parse_sets(set_),
                       trust_remote_code=trust_remote_code, progress=not json_out)
    terminal.show(r, json_out, test)


@app.command()
def card(
    triggers: Path = typer.Option(..., help="triggers: a text file (one per line) or a JSON list of strings"),
    targets: Path = typer.Option(..., help="targets, same format; line i answers trigger i"),
    out: Path = typer.Option(..., "--out", "-o", help="card file to write (JSON, owner-only permissions)"),
    match: str = typer.Option("substring", help="substring (the output contains the target) or exact"),
    method: str = typer.Option("custom", help="a name for the fingerprint's method, shown in reports"),
    base_model: Optional[str] = typer.Option(None, help="the model the fingerprint was planted in (the 'base' row "
                                             "of `meraser run`)", show_default="none"),
    template: str = typer.Option("chat", help="how triggers are rendered: chat, raw or a custom template"),
    system_prompt: Optional[str] = typer.Option(None, help="system prompt used when verifying",
                                                show_default="the template's"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="greedy decoding length for verification",
                                                 show_default="enough for the longest target"),
    decoys: Optional[Path] = typer.Option(None, help="decoy targets for the likelihood ownership test: targets drawn "
                                          "the way the real ones were, never planted (a text file, one per line, "
                                          "or a JSON list)", show_default="none: no likelihood test"),
    overwrite: bool = typer.Option(False, help="replace an existing card"),
):
    """Make a fingerprint card from your own triggers and targets (a fingerprint planted elsewhere)."""
    from meraser.fingerprints.card import card_from_files

    c = card_from_files(triggers, targets, out, method=method, match=match, base_model=base_model, template=template,
                        system_prompt=system_prompt, max_new_tokens=max_new_tokens, overwrite=overwrite,
                        decoys=decoys)
    _console().print(f"[green]card[/] {out}: {len(c.triggers)} triggers, match {c.match}, max_new_tokens "
                     f"{c.max_new_tokens} (keep it secret; verify with `meraser verify --card {out}`)\n"
                     f"checksum (publish it to commit to this card without showing it): {c.checksum}")
