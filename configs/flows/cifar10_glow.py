"""Glow on CIFAR-10 (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions").

Sources, cited next to each value below:
  [paper]   arXiv 1807.03039: sec. 3 (architecture), sec. 5 (quantitative
            experiments: Adam with alpha = 0.001 and default beta1, beta2),
            sec. 6 (temperature 0.7 for samples).
  [readme]  openai/glow README.md, "CIFAR-10 Quantitative result":
              mpiexec -n 8 python train.py --problem cifar10 --image_size 32
              --n_level 3 --depth 32 --flow_permutation 2 --flow_coupling 1
              --seed 0 --learntop --lr 0.001 --n_bits_x 8
  [train]   openai/glow train.py argparse defaults (for every flag the command
            leaves out) and its training loop (warm-up).
  [model]   openai/glow model.py (preprocessing, coupling, priors).
  [optim]   openai/glow optim.py (adamax / adam, Polyak averaging).
  [data]    openai/glow data_loaders/get_mnist_cifar.py (CIFAR-10 augmentation).
The global batch is 8 processes x n_batch_train 64 = 512 ([readme] -n 8;
[train] n_batch_train=64, anchor_size=32 = image_size so 64 per process), and an
epoch is train_its = ceil(50,000 / 512) = 98 steps ([train] get_its).

Differences from the original that this config cannot express:
  - optimiser: the command runs [train]'s default --optimizer adamax, with
    beta2 = 1 - 1 / (train_its * polyak_epochs) = 1 - 1/98 ~ 0.9898 ([optim]);
    the paper says Adam with default betas. Ours is Adam with beta2 = 0.999
    (score_sde/experiment.py), i.e. the paper's description.
  - augmentation: [train] --dal 1 gives random shifts of up to 10% of the width
    and height (Keras ImageDataGenerator width/height_shift_range=0.1) and NO
    horizontal flips (flips only at --dal 2) [data]. Our pipeline has flips
    only, so this config trains without augmentation (see data.random_flip).
  - actnorm's data-dependent initialisation used n_batch_init=256 images [train];
    ours uses the first 256 training images (score_sde.experiment.flow_init_batch).
  - data scale: Glow models x / 256 - 1/2 + U(0, 1/256), in [-1/2, 1/2]; ours is
    [-1, 1] (data.centered). A fixed rescaling only shifts log-likelihoods by a
    constant that bits/dim accounts for.
"""
from configs import defaults


def get_config():
  config = defaults.cifar10()

  # training
  training = config.training
  # [readme] -n 8 x [train] --n_batch_train 64 = 512 images per step (one step is
  # synchronous over the 8 processes: Horovod all-reduce of the gradients).
  training.batch_size = 512
  # (ours) [train] --epochs defaults to 1,000,000 (run until stopped) and the
  # paper gives no length. 2048 epochs: 2048 x 50,000 / 512 = 200,000 steps (+1).
  training.n_iters = 200001
  training.snapshot_freq = 20000              # (ours) 10 kept checkpoints
  training.snapshot_freq_for_preemption = 5000
  training.snapshot_sampling = True
  # training.sde / continuous / likelihood_weighting are not read by flows: defaults.

  # sampling
  # Samples are x = f^-1(z), z ~ N(0, T^2 I). [paper] sec. 6 ("Effect of
  # temperature", Fig. 8) picks T = 0.7 for its CelebA-HQ samples, and [train]
  # draws sample grids at T in {0, .25, .5, .6, .7, .8, .9, 1}. The default stays
  # 1.0: the model's own distribution, the one FID and bits/dim are about
  # (use --config.sampling.temperature=0.7 for the paper's pictures).
  config.sampling.temperature = 1.0

  # evaluation
  evaluate = config.eval
  evaluate.enable_bpd = True                  # [paper] sec. 5: CIFAR-10 test 3.35 bits/dim
  evaluate.bpd_dataset = 'test'
  evaluate.batch_size = 1000                  # (ours) divides the 10,000 test images
  evaluate.num_samples = 50000                # as the other CIFAR-10 configs (FID / IS)

  # data
  data = config.data
  # [data]: no horizontal flips at the default --dal 1 (random shifts instead,
  # which we cannot do). Flips would be a different augmentation from Glow's;
  # set True if overfitting shows in the test bits/dim.
  data.random_flip = False
  # [readme] --n_bits_x 8 (all 256 levels); [model] preprocess: z = x / 256 - .5
  # + U(0, 1/256), i.e. uniform dequantisation.
  data.uniform_dequantization = True
  data.centered = True                        # (ours) [-1, 1]; Glow's is [-1/2, 1/2]

  # model
  model = config.model
  model.name = 'glow'
  # [paper] sec. 3 / [model] prior(): a diagonal Gaussian, whose mean and
  # log-std are a zero-initialised convolution of zeros when --learntop (i.e.
  # learned per position and channel), and N(0, I) otherwise. Factored-out halves
  # get Gaussians conditioned on the kept half ([model] split2d_prior).
  # (The released [model] uses the plain 1x1 convolution, not the LU form.)
  model.prior = 'gaussian'
  model.learn_top = True                      # [readme] --learntop
  model.num_levels = 3                        # [readme] --n_level 3 (argparse prefix of --n_levels)
  model.num_steps = 32                        # [readme] --depth 32 (K steps of flow per level)
  model.hidden_features = 512                 # [train] --width 512 (default; the command leaves it)
  # [readme] --flow_coupling 1 = affine ([train]: 0=additive, 1=affine); [model]
  # scale = sigmoid(h + 2). --flow_permutation 2 = invertible 1x1 convolution,
  # the only permutation the model implements (no key).
  model.coupling = 'affine'
  # [optim] polyak(): tf.train.ExponentialMovingAverage(decay=beta2, zero_debias)
  # with beta2 = 1 - 1 / (train_its * polyak_epochs) = 1 - 1 / (98 * 1) ~ 0.9898
  # ([train] --polyak_epochs 1). Note [train] never swaps the average in: the
  # model.polyak_swap() calls around the test pass are commented out, so the
  # published bits/dim are of the raw parameters. Ours evaluates the EMA; with a
  # horizon of one epoch it stays close to the raw parameters.
  model.ema_rate = 1. - 1. / 98
  model.dropout = 0.                          # coupling networks: no dropout in Glow

  # optimisation
  optim = config.optim
  # [paper] sec. 5: Adam, alpha = 0.001, default beta1 and beta2 ([readme] --lr
  # 0.001; [train] --beta1 .9; [optim] epsilon=1e-8). See the module docstring
  # for the Adamax default of [train].
  optim.optimizer = 'Adam'
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  # [train] --epochs_warmup 10: lr * min(1, n_processed / (n_train * 10)), linear
  # from 0 over 10 x 50,000 = 500,000 images = 500,000 / 512 = 976.6 -> 977 steps.
  optim.warmup = 977
  # [train] --weight_decay 1. ("Switched off by default"): [optim] applies it as
  # a multiplicative factor, w <- weight_decay * w - lr * update, so 1 = none.
  optim.weight_decay = 0.
  # [optim]: no gradient clipping in any optimiser (nor in [train] / [model]);
  # -1 disables ours. (RealNVP's code clips the global norm at 100 on a nats-per-
  # image loss, ~0.047 on our bits/dim loss: the value to try if training diverges.)
  optim.grad_clip = -1.

  return config
