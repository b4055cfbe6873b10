"""Configs for the variance-exploding SDE (SMLD / NCSN, NCSN++)."""
