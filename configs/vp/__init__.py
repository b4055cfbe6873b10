"""Configs for the variance-preserving SDE (DDPM family)."""
