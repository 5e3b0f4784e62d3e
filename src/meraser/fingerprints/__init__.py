"""Backdoor fingerprints to embed and verify (filled in by the fingerprint methods)."""
