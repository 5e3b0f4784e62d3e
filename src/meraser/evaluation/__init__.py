"""Evaluation: perplexity, zero-shot accuracy through lm-evaluation-harness, fingerprint success rate, and the
`evaluate` entry point that prints one table per model."""
