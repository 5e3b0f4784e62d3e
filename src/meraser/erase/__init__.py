"""MEraser (Zhang et al. 2025, paper section 4): mismatched/clean data, erase, recover, transferable adapter."""
