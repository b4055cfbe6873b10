"""The DDPM U-Net (Ho et al. 2020) with the VP SDE / DDPM chain."""
