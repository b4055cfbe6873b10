"""Normalizing-flow configs (NICE, RealNVP, Glow) on CIFAR-10."""
