"""Configs for the sub-VP SDE."""
