"""NCSN (Song & Ermon 2019) configs: the discrete VE objective on integer noise
indices, annealed Langevin sampling. Suffixes name the NCSNv2 techniques used
(1: sigma_max from the data, 2: num_scales from the data dimension,
4: step size / steps per level, 5: EMA of the weights); no suffix = the
original NCSN (10 levels from 1 to 0.01, no EMA)."""
