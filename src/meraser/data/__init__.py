"""Instruction data: sources of (prompt, response) pairs, and formatting them into training examples."""

from meraser.data.formatting import FormatConfig, Formatter, collate
from meraser.data.sources import Pair, load_pairs, write_pairs

__all__ = ["FormatConfig", "Formatter", "Pair", "collate", "load_pairs", "write_pairs"]
