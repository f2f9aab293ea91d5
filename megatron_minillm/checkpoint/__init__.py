"""Checkpoint formats: the HF <-> megatron parameter mapping (converters build on it)."""
