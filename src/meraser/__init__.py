"""meraser: erase backdoor fingerprints from LLMs (MEraser), make fingerprinted models, and evaluate both.

Heavy libraries (torch, transformers, peft, lm-eval) are imported inside the functions that need them, so that
`import meraser` and `meraser --help` stay fast.
"""

__version__ = "0.1.0"
