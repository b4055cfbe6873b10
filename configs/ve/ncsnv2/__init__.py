"""NCSNv2 (Song & Ermon 2020) configs: unconditional RefineNet with output
scaling s(x, i) = f(x) / sigma_i, the discrete VE objective, annealed Langevin
sampling."""
