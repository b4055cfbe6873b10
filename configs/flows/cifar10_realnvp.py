"""RealNVP on CIFAR-10 (Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP").

Sources, cited next to each value below:
  [paper]  arXiv 1605.08803, sec. 3.6 (multi-scale architecture), 3.7 (batch
           normalisation) and 4.1 (procedure: CIFAR-10 settings, optimiser, data).
  [code]   the authors' TensorFlow code, tensorflow/models research/real_nvp/
           real_nvp_multiscale_dataset.py: get_default_hparams() and the
           optimisation block of RealNVP.__init__; README.md training commands.
           The code has no CIFAR-10 input pipeline (only imnet, celeba, lsun), so
           CIFAR-10-specific values come from the paper; the code gives the
           generic optimiser settings.
The paper states no training length, learning-rate schedule, EMA or evaluation
batch size; those are our choices and are marked "(ours)".

Differences from the paper that this config cannot express (the model,
score_sde/models/realnvp.py, does not implement them):
  - no batch normalisation, neither in the coupling ResNets nor as a flow layer
    on each coupling's output ([paper] sec. 3.7, appendix E; [code]
    use_batch_norm=1), and no weight normalisation ([paper] sec. 3.7);
  - no logit transform: the paper models logit(alpha + (1 - alpha) x / 256) with
    alpha = .05 ([paper] sec. 4.1; [code] data_constraint=.9 = 1 - 2 alpha);
    here the dequantised data are modelled directly in [-1, 1].
The coupling ResNets double `hidden_features` at each further scale, as the
paper and code do ([paper] sec. 3.6; [code] dim = base_dim * 2**scale_idx); the
code's extra doubling (2 * dim) in the channel-wise couplings is not made.
"""
import math

from configs import defaults


def get_config():
  config = defaults.cifar10()

  # training
  training = config.training
  # [paper] sec. 4.1: "We use a batch size of 64." ([code] batch_size=64.)
  training.batch_size = 64
  # (ours) Neither the paper nor the code gives a training length ([code]
  # --train_steps is a command-line flag, default 10). 512 epochs:
  # 512 x 50,000 / 64 = 400,000 steps (+1, as the other configs count).
  training.n_iters = 400001
  training.snapshot_freq = 50000              # (ours) 8 kept checkpoints
  training.snapshot_freq_for_preemption = 10000
  training.snapshot_sampling = True
  # training.sde / continuous / likelihood_weighting are not read by flows: defaults.

  # sampling
  # Samples are x = f^-1(z), z ~ N(0, T^2 I). [paper] and [code] sample at
  # T = 1 (standard_normal_sample); keep 1.0.
  config.sampling.temperature = 1.0

  # evaluation
  evaluate = config.eval
  evaluate.enable_bpd = True                  # [paper] Table 1: test bits/dim (3.49)
  evaluate.bpd_dataset = 'test'
  evaluate.batch_size = 1000                  # (ours) divides the 10,000 test images
  evaluate.num_samples = 50000                # as the other CIFAR-10 configs (FID / IS)

  # data
  data = config.data
  # [paper] sec. 4.1: "We also augment the CIFAR-10, CelebA and LSUN datasets
  # during training to also include horizontal flips of the training examples."
  data.random_flip = True
  # [paper] sec. 4.1 ("the recommended jittering procedure": pixels in [0, 256]^D);
  # [code] x_in = (x + tf.random.uniform(...)) / 256: uniform dequantisation.
  data.uniform_dequantization = True
  # (ours) [-1, 1]; the paper's logit transform (alpha = .05) is not implemented.
  data.centered = True

  # model
  model = config.model
  model.name = 'realnvp'
  # [paper] sec. 4.1: "We set the prior p_Z to be an isotropic unit norm Gaussian."
  model.prior = 'gaussian'
  # [paper] sec. 4.1: "For CIFAR-10, we use 8 residual blocks, 64 feature maps,
  # and downscale only once." One downscale = 2 scales: scale 1 at 32x32 (3
  # checkerboard couplings, squeeze, 3 channel-wise couplings, factor out half),
  # final scale at 16x16 (4 checkerboard couplings) [paper] sec. 3.6. In [code]
  # terms: n_scale=2, residual_blocks=8, base_dim=64.
  model.num_levels = 2
  model.num_res_blocks = 8
  model.hidden_features = 64
  # The scale function is tanh(.) times a learned scale and the translation is
  # affine ([paper] sec. 4.1; [code] log_rescaling = scale * tanh(...)): fixed
  # in the model (log_scale='tanh'), no key.
  # (ours) No parameter averaging in [paper] or [code] (the only running averages
  # there are batch-norm statistics). 0.999, as the CIFAR-10 score models: a
  # horizon of ~1,000 steps, 1.3 epochs at batch 64.
  model.ema_rate = 0.999
  model.dropout = 0.                          # coupling networks: no dropout in [paper] / [code]

  # optimisation
  optim = config.optim
  # [paper] sec. 4.1: "We optimize with ADAM with default hyperparameters".
  # [code] learning_rate=0.001, beta1 = 1 - momentum(0.1) = 0.9,
  # beta2 = 1 - decay(1e-3) = 0.999 (our Adam's fixed beta2), epsilon=1e-08.
  optim.optimizer = 'Adam'
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.eps = 1e-8
  # [code]: constant learning rate, no warm-up (hps.learning_rate goes straight
  # to AdamOptimizer; no schedule). The paper mentions none either.
  optim.warmup = 0
  # [paper] sec. 4.1: "an L2 regularization on the weight scale parameters with
  # coefficient 5 * 10^-5"; [code] l2_coeff=0.00005 times the sum of squares of
  # the weight-norm magnitudes ('magnitude') and the tanh scales
  # ('rescaling_scale') only, added to the loss. Ours is different: AdamW's
  # decoupled decay, w <- w - lr * weight_decay * w, on every parameter (there
  # are no weight-norm magnitudes here). Same number, not the same regulariser:
  # at lr 1e-3 it shrinks the weights by exp(-lr * wd * n_iters) = exp(-0.02)
  # over the whole run, i.e. it is nearly inert.
  optim.weight_decay = 5e-5
  # [code] clip_gradient=100. (default, and in every README command):
  # tf.clip_by_global_norm(grads, 100) on the gradient of the batch-mean negative
  # log-likelihood in nats per image (+ the L2 term). Our flow loss is the mean
  # bits/dim (score_sde/losses.py, get_flow_nll_loss_fn), whose gradient is
  # 32 * 32 * 3 * ln 2 ~ 2129 times smaller, so the same threshold in our units is
  # 100 / 2129 ~ 0.047 (a clip of 100 would never bite).
  optim.grad_clip = 100. / (32 * 32 * 3 * math.log(2.))

  return config
