"""Benchmark harnesses: scripts that print numbers and ratios against a reference measured in the
same run. Not part of the installed library (`hf_dino`); run from a checkout."""
