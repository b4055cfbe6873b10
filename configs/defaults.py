"""Shared defaults for every experiment config.

The key names are those of the reference code base (Song et al. 2021), so a
paper config reads the same here; keys marked "(ours)" are additions. Each
experiment file starts from one of `cifar10()`, `celeba()`, `lsun()`,
`digits()` or `toy()` and overrides what differs. Configs are locked by
`configs.finalize`, so a misspelt override fails with the key's name.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  """Defaults common to all datasets (the reference's CIFAR-10 defaults)."""
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.sde = 'vesde'                # vesde | vpsde | subvpsde
  training.continuous = True
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.importance_sampling = False  # (ours) t ~ g^2/sigma^2 with likelihood weighting
  training.reduce_mean = False
  training.n_jitted_steps = 5           # steps per host call (metrics fetched once per call)
  training.unroll_jitted_steps = False  # (ours) compile the n steps as one unrolled program
  # (ours) the train step's state: 'tree' (parameter trees, plain jax.jit: GPU / TPU),
  # 'flat' (flat parameter vectors + XLA:CPU options: compiles faster on the CPU), or
  # 'auto' (flat on the CPU backend, tree elsewhere). Same maths, equal to round-off,
  # so a resumed run may change it.
  training.param_layout = 'auto'
  training.loss = 'auto'                # (ours) auto | dsm | smld | ddpm | hybrid
  training.hybrid_lambda = 0.001        # (ours) weight of L_vlb in the hybrid loss
  training.ema_warmup = False           # (ours) EMA rate min(ema_rate, (1+step)/(10+step))

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'                # pc | ode | sde | ddim | heun | edm | dpmpp_2m |
                                        # dpmpp_3m | dpmpp_2m_sde | unipc
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.snr_norm = 'example'         # (ours) Langevin step from per-example norms | 'batch'
  sampling.num_steps = 0                # (ours) 0: the SDE's N
  sampling.ode_solver = 'tsit5'         # (ours) tsit5 | dopri5 | heun | euler
  sampling.sde_solver = 'euler'         # (ours) euler | shark | sra1 (diffrax)
  sampling.matmul_precision = 'inherit' # (ours) sampler dots / convs: inherit | default | high | highest
  sampling.rtol = 1e-5                  # (ours) adaptive ODE tolerances
  sampling.atol = 1e-5
  sampling.ddim_eta = 0.0               # (ours)
  # (ours) few-step samplers (score_sde/sampling/edm.py, multistep.py)
  sampling.time_schedule = 'auto'       # karras | logsnr | time | auto: the method's own
  sampling.rho = 7.0                    # Karras schedule exponent
  sampling.grid_sigma_min = 0.002       # the grid's interior noise levels s/m stay in
  sampling.grid_sigma_max = 80.0        #   [min, max] (EDM's range; ends at eps and T)
  sampling.s_churn = 40.0               # edm: stochastic churn (EDM's S_churn, S_tmin, ...)
  sampling.s_tmin = 0.05
  sampling.s_tmax = 50.0
  sampling.s_noise = 1.003
  sampling.solver_order = 3             # unipc: 1, 2 or 3
  sampling.lower_order_final = True     # dpmpp_*, unipc: lower order at the last steps (K < 15)

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.rtol = 1e-5                  # (ours) likelihood ODE tolerances
  evaluate.atol = 1e-5
  evaluate.matmul_precision = 'highest' # (ours) likelihood dots / convs: default | high | highest
  evaluate.num_repeats = 1              # (ours) dequantisation repeats for bpd

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  data.data_dir = ''                    # (ours) tfds data_dir; '' = tfds default

  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'
  model.sigma_min = 0.01
  model.sigma_max = 50.
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.beta_schedule = 'linear'        # (ours) linear | cosine (VP family)
  model.dropout = 0.1
  model.embedding_type = 'fourier'
  model.dtype = 'float32'               # (ours) float32 | bfloat16 (compute dtype)

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  return config


def cifar10() -> ml_collections.ConfigDict:
  return base()


def celeba() -> ml_collections.ConfigDict:
  config = base()
  config.sampling.snr = 0.17
  config.eval.begin_ckpt = 1
  config.eval.enable_sampling = True
  config.data.dataset = 'CELEBA'
  config.data.image_size = 64
  config.model.sigma_max = 90.
  return config


def lsun() -> ml_collections.ConfigDict:
  config = base()
  config.training.batch_size = 64
  config.training.n_iters = 2400001
  config.training.snapshot_freq_for_preemption = 5000
  config.sampling.snr = 0.075
  config.eval.begin_ckpt = 50
  config.eval.end_ckpt = 96
  config.eval.batch_size = 512
  config.eval.enable_sampling = True
  config.data.dataset = 'LSUN'
  config.data.image_size = 256
  config.model.sigma_max = 378.
  config.model.num_scales = 2000
  config.model.dropout = 0.
  return config


def digits() -> ml_collections.ConfigDict:
  """The embedded 8x8 digits (pixels 0..16): short CPU runs."""
  config = base()
  training = config.training
  training.batch_size = 64
  training.n_iters = 1700
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 250
  training.log_freq = 50
  training.eval_freq = 250
  training.n_jitted_steps = 1
  training.ema_warmup = True
  config.eval.batch_size = 297
  config.eval.num_samples = 297   # as many as the test split, for digits-FID
  config.eval.enable_bpd = True
  data = config.data
  data.dataset = 'DIGITS'
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False      # flipped digits are not digits
  data.centered = True
  data.uniform_dequantization = True   # train on the density that bits/dim measure
  config.model.dropout = 0.
  config.model.sigma_max = 8.   # ~ largest pairwise distance of the digits in [-1, 1]
  config.optim.lr = 2e-3
  config.optim.warmup = 100
  return config


def toy() -> ml_collections.ConfigDict:
  """Low-dimensional toy data (MLP score networks)."""
  config = base()
  training = config.training
  training.batch_size = 512
  training.n_iters = 5000
  training.snapshot_freq = 2500
  training.snapshot_freq_for_preemption = 1000
  training.eval_freq = 500
  training.n_jitted_steps = 1
  training.snapshot_sampling = False
  training.ema_warmup = True
  config.sampling.snr_norm = 'batch'    # per-example norms vanish near 2-D modes
  config.eval.batch_size = 1000
  config.eval.num_samples = 1000
  data = config.data
  data.dataset = 'TOY_MIXTURE'
  data.dim = 2
  data.image_size = 0
  data.num_channels = 0
  data.random_flip = False
  data.centered = True
  config.model.dropout = 0.
  config.model.sigma_max = 6.
  config.optim.lr = 1e-3
  config.optim.warmup = 100
  return config


def digits_ncsnpp(config, *, nf: int = 24, ve: bool = False) -> ml_collections.ConfigDict:
  """A small NCSN++ (DDPM++ when not `ve`) for 8x8 digits: ~1 M parameters at nf 24."""
  model = config.model
  model.name = 'ncsnpp'
  model.scale_by_sigma = ve
  model.ema_rate = 0.999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = nf
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = False
  model.fir_kernel = (1, 3, 3, 1)
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'none'
  model.progressive_input = 'none'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.embedding_type = 'fourier' if ve else 'positional'
  model.fourier_scale = 16.
  model.conv_size = 3
  return config


def wrn_classifier(config, *, sde: str, blocks_per_group: int, channel_multiplier: int,
                   embedding_size: int) -> ml_collections.ConfigDict:
  """A noise-conditional Wide-ResNet p(y | x_t) for `sde` (launch.py train_classifier):
  continuous time, Fourier embedding of log sigma, 10 classes, EMA 0.999, no
  snapshot samples or bits/dim. WRN-(6 blocks_per_group + 4)-channel_multiplier."""
  training = config.training
  training.sde = sde
  training.continuous = True
  training.snapshot_sampling = False
  config.eval.enable_bpd = False
  model = config.model
  model.name = 'wideresnet'
  model.num_classes = 10
  model.blocks_per_group = blocks_per_group
  model.channel_multiplier = channel_multiplier
  model.base_channels = 16
  model.embedding_type = 'fourier'
  model.embedding_size = embedding_size
  model.fourier_scale = 16.
  model.standardize = True
  model.dropout = 0.
  model.ema_rate = 0.999
  return config


def digits_flow(config, name: str) -> ml_collections.ConfigDict:
  """A normalizing flow on the digits: maximum likelihood on the dequantised digits
  (the same data and dequantisation as the score models' bits/dim), EMA 0.999."""
  config.model.name = name
  config.model.prior = 'gaussian'
  config.model.ema_rate = 0.999
  config.model.dropout = 0.0            # of the coupling networks' hidden units (training)
  config.sampling.temperature = 1.0     # latent std when sampling (Glow: 0.7 looks cleaner)
  config.optim.lr = 1e-3
  return config
