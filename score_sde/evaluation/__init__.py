"""Evaluation: sample-quality metrics (FID / KID / IS), the Inception-v3 feature
network, the digits classifier that stands in for it on the embedded digits,
and the bits/dim baselines (uniform, per-pixel histogram)."""
