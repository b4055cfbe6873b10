"""Controllable generation with one unconditional score model: inpainting,
colourisation and class-conditional sampling (Song et al. 2021, section 5 and
appendix I), on the samplers of `score_sde.sampling`.

Inpainting. Known entries Omega (mask = 1) hold an observation y = x_0(Omega).
The PC sampler runs on the whole image, and after every predictor and every
corrector update the known entries are replaced by a fresh draw of the
forward-diffused observation (the PC loop of `score_sde.sampling.pc_sampler`
with the projection `replacement_projection`),

  x(Omega) <- m(t) y + s(t) z,   z ~ N(0, I),   i.e. x_t(Omega) ~ p_0t(x_t(Omega) | y),

at the time t the state has reached (after the predictor: the next grid time).
The unknown entries thus follow the score grad log p_t(x(Omega^c) | x_t(Omega))
of the joint model at the diffused observation, the paper's approximation of
grad log p_t(x(Omega^c) | y). The returned images hold y exactly on Omega.

  Exact when the known and unknown parts are independent under the data
  distribution. It is an approximation otherwise, and for Gaussian data with
  correlated parts its output is biased: e.g. for (u, k) ~ N(0, [[1, .9],
  [.9, 1]]) and k = 2 observed, the VE / VP samplers with the exact score
  return u with mean 1.25 and variance 0.32 instead of the exact conditional's
  1.8 and 0.19 (computed in closed form in tests/test_controllable.py, which
  checks the sampler against that closed form). The reason: at large t the
  unknown part is steered towards the mean of p_t(u | k_t = y + s z), which
  is rho y / (1 + s^2) under VE, while p_t(u | k_0 = y) has mean rho y; the
  late steps do not undo the difference. Corrector steps reduce the bias:
  they pull towards p_t(u | k_t) at every t, which approaches p(u | y) as
  t -> 0. With 5 annealed-Langevin steps per level (snr 0.16, N = 1000) the
  example above gives mean 1.78 / 1.74 and variance 0.195 / 0.207 (VE / VP).

Probability-flow option: `probability_flow=True` with the euler_maruyama or
reverse_diffusion predictor takes deterministic ODE steps for the unknown
entries, still with the replacement above (so the known entries remain
random draws of p_0t; the output is not a deterministic function of the
prior draw). Adaptive ODE solvers are not offered: replacement needs the
sampler's own grid.

Colourisation. A fixed orthogonal 3x3 matrix M maps each pixel's RGB vector to
(grey, chroma_1, chroma_2) coordinates,

  M = [u_1 u_2 u_3],  u_1 = (1, 1, 1) / sqrt(3),  u_2 = (-2, 1, 1) / sqrt(6),
                      u_3 = (0, 1, -1) / sqrt(2),
  latent = x M (per pixel),  x = latent M^T.

Because M is orthogonal and every SDE here is isotropic with a drift linear
in x, the diffused latent is the same SDE in rotated coordinates. A grey-scale
image g (the mean of the RGB channels) fixes the first coordinate, sqrt(3) g;
colourisation is inpainting in latent space with the mask (1, 0, 0) on every
pixel. The output's channel mean equals g exactly.

Class-conditional sampling. Bayes' rule for the time-t marginals,

  grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x),

with a noise-conditional classifier p_phi(y | x_t, t) (`models/wideresnet.py`)
trained by cross-entropy on x_t ~ p_0t(x_t | x_0), t ~ U(eps, T). Any sampler
of `score_sde.sampling` then runs on score + scale * grad log p_phi(y | x_t);
scale = 1 is the exact conditional, scale > 1 sharpens the classes.

Shapes and spaces. Images are [B, H, W, C] in model space (after the data
scaler), results too: apply the inverse scaler for [0, 1]. Masks are 1 for
known and 0 for missing entries. Randomness is per example (key i =
fold_in(key, i)), as in `score_sde.sampling`.

Layers of this module: pure samplers (`replacement_pc_sampler`, the PC loop
with `replacement_projection`); builders returning pure functions of (key,
params, inputs) for `jax.jit` with a mesh (`build_inpainter`,
`build_colorizer`, `build_conditional_sampler`); and convenience calls with a
fixed score function (`inpaint`, `colorize`, `conditional_sample`). The
classifier's logits are `score_sde.score_fn`, its objective
`score_sde.losses.get_classifier_loss_fn`, and the jobs over a trained workdir
`score_sde.jobs.controllable`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import losses
from score_sde import parallel
from score_sde import sampling

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
LogitsFn = losses.LogitsFn
Info = dict

PC_OPTIONS = tuple(sampling.METHODS['pc'].defaults)


# ----------------------------------------------------------------------------
# The colour decoupling
# ----------------------------------------------------------------------------

def color_decoupling_matrix() -> np.ndarray:
  """The orthogonal M [3, 3]: columns (1,1,1)/sqrt3, (-2,1,1)/sqrt6, (0,1,-1)/sqrt2."""
  return np.stack([np.array([1.0, 1.0, 1.0]) / math.sqrt(3.0),
                   np.array([-2.0, 1.0, 1.0]) / math.sqrt(6.0),
                   np.array([0.0, 1.0, -1.0]) / math.sqrt(2.0)], axis=1)


def decouple_colors(x: jax.Array) -> jax.Array:
  """RGB [..., 3] -> (sqrt(3) grey, chroma_1, chroma_2) [..., 3]: x M."""
  return jnp.einsum('...i,ij->...j', x, jnp.asarray(color_decoupling_matrix(), x.dtype))


def couple_colors(latent: jax.Array) -> jax.Array:
  """The inverse of `decouple_colors`: latent M^T."""
  m = jnp.asarray(color_decoupling_matrix(), latent.dtype)
  return jnp.einsum('...j,ij->...i', latent, m)


def to_grayscale(images) -> np.ndarray | jax.Array:
  """[B, H, W, C] -> [B, H, W, 1], the mean over channels (the colouriser's grey)."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.mean(images, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def _center_box(size: int, fraction: float, seed: int) -> np.ndarray:
  del seed
  side = int(round(size * fraction))
  start = (size - side) // 2
  known = np.ones((size, size), np.float32)
  known[start:start + side, start:start + side] = 0.0
  return known


def _half(axis: int, missing_first: bool):
  def make(size: int, fraction: float, seed: int) -> np.ndarray:
    del fraction, seed
    known = np.ones((size, size), np.float32)
    index = [slice(None), slice(None)]
    index[axis] = slice(0, size // 2) if missing_first else slice(size // 2, size)
    known[tuple(index)] = 0.0
    return known
  return make


def _random_pixels(size: int, fraction: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.uniform(size=(size, size)) >= fraction).astype(np.float32)


class MaskPattern(NamedTuple):
  """A named mask: `make(size, fraction, seed) -> [H, W]` (1 known)."""
  make: Callable
  default_fraction: float | None     # None: the pattern takes no fraction
  description: str


# Pattern names describe the MISSING region (what the model fills in).
MASK_PATTERNS = {
    'center_box': MaskPattern(_center_box, 0.5, 'a central square of side fraction * H missing'),
    'left_half': MaskPattern(_half(1, True), None, 'the left half missing'),
    'right_half': MaskPattern(_half(1, False), None, 'the right half missing'),
    'top_half': MaskPattern(_half(0, True), None, 'the top half missing'),
    'bottom_half': MaskPattern(_half(0, False), None, 'the bottom half missing'),
    'random_pixels': MaskPattern(_random_pixels, 0.5,
                                 'each pixel missing with probability fraction (seeded)'),
}


def _pattern_name(name: str) -> str:
  return str(name).strip().lower().replace(' ', '_').replace('-', '_')


def is_mask_pattern(name: str) -> bool:
  """Whether `name` is one of MASK_PATTERNS (any case, '-' or '_')."""
  return _pattern_name(name) in MASK_PATTERNS


def make_mask(pattern: str, image_size: int, num_channels: int, *,
              fraction: float | None = None, seed: int = 0) -> np.ndarray:
  """A named mask [H, W, C] float32, 1 = known pixel (all channels alike).

  pattern: 'center box' | 'left half' | 'right half' | 'top half' |
    'bottom half' | 'random pixels' (spaces or underscores). `fraction`: the
    missing box's side as a fraction of H ('center box', default 0.5) or the
    probability that a pixel is missing ('random pixels', default 0.5, drawn
    with `seed`).
  """
  name = _pattern_name(pattern)
  spec = MASK_PATTERNS.get(name)
  if spec is None:
    raise ValueError(f'unknown mask pattern {pattern!r}; valid: {sorted(MASK_PATTERNS)} '
                     f'(or a mask file: .npy / .npz / image).')
  if spec.default_fraction is None:
    if fraction is not None:
      raise ValueError(f'mask pattern {name!r} takes no fraction; got {fraction}.')
    fraction = 0.0
  else:
    fraction = spec.default_fraction if fraction is None else float(fraction)
    if not 0.0 < fraction < 1.0:
      raise ValueError(f'the fraction of mask pattern {name!r} must lie in (0, 1); '
                       f'got {fraction}.')
  if image_size < 2:
    raise ValueError(f'image_size must be >= 2; got {image_size}.')
  known = spec.make(int(image_size), fraction, int(seed))
  return np.repeat(known[..., None], int(num_channels), axis=-1)


def check_mask(mask, example_shape, batch_size: int | None = None) -> np.ndarray:
  """A binary mask as float32 [B, *example_shape] (or [*example_shape] without B).

  Accepted: [*example_shape], and for images [H, W] or [H, W, 1] (the same
  for every channel), each optionally with a leading batch axis of size B.
  """
  mask = np.asarray(mask)
  example_shape = tuple(example_shape)
  if mask.dtype == bool:
    mask = mask.astype(np.float32)
  if not np.issubdtype(mask.dtype, np.number):
    raise ValueError(f'the mask must be numeric (0 missing, 1 known); got dtype {mask.dtype}.')
  values = np.unique(mask)
  if not np.all(np.isin(values, (0, 1))):
    shown = values[~np.isin(values, (0, 1))][:5]
    raise ValueError(f'the mask must be binary (1 = known, 0 = missing); it holds other '
                     f'values, e.g. {shown.tolist()}. Threshold it first, e.g. mask > 0.5.')
  mask = mask.astype(np.float32)
  per_example = [example_shape]
  if len(example_shape) == 3:
    per_example += [example_shape[:2], example_shape[:2] + (1,)]
  shape = tuple(mask.shape)
  match = None
  for candidate in per_example:
    if shape == candidate:
      match = mask[None]
    elif batch_size is not None and shape == (batch_size,) + candidate:
      match = mask
    if match is not None:
      if match.ndim == len(example_shape):            # [B, H, W] -> [B, H, W, 1]
        match = match[..., None]
      break
  if match is None:
    valid = [list(c) for c in per_example]
    raise ValueError(
        f'the mask has shape {list(shape)}, which does not fit images of shape '
        f'{list(example_shape)}; give one of {valid}'
        + (f', optionally with a leading batch axis of {batch_size}' if batch_size else '')
        + '.')
  full = np.broadcast_to(match, match.shape[:1] + example_shape).astype(np.float32)
  if batch_size is None:
    return np.ascontiguousarray(full[0])
  return np.ascontiguousarray(np.broadcast_to(full, (batch_size,) + example_shape))


def check_images(images, shape, what: str = 'images') -> None:
  images_shape = tuple(np.shape(images))
  shape = tuple(shape)
  if images_shape == shape:
    return
  if len(images_shape) != len(shape):
    raise ValueError(f'{what} must have shape {list(shape)} ([B, H, W, C]); got '
                     f'{list(images_shape)}.')
  if images_shape[0] != shape[0]:
    raise ValueError(f'{what}: got a batch of {images_shape[0]}, this function was built '
                     f'for {shape[0]}.')
  if len(shape) == 4 and images_shape[-1] != shape[-1]:
    raise ValueError(f'{what} have {images_shape[-1]} channel(s) but the model takes '
                     f'{shape[-1]} (config.data.num_channels); convert them first.')
  raise ValueError(f'{what} have size {list(images_shape[1:])} but the model takes '
                   f'{list(shape[1:])} (config.data.image_size); resize them first.')


# ----------------------------------------------------------------------------
# The PC sampler with replacement (inpainting and colourisation)
# ----------------------------------------------------------------------------

def replacement_projection(sde, observed, mask, *, to_latent: Callable = sampling.identity,
                           from_latent: Callable = sampling.identity) -> sampling.Projection:
  """The PC loop's projection for replacement: known latent entries <- a draw of p_0t(. | y).

  project(x, t, keys): x(Omega) <- m(t) y + s(t) z in latent coordinates, z from
  `keys`; finish(x): x(Omega) <- y, so the output holds the observation exactly.
  observed, mask: [B, ...] in latent coordinates (see `replacement_pc_sampler`).
  """
  example_shape = tuple(observed.shape[1:])
  known = jnp.asarray(mask) > 0.5

  def merge(known_values, x):
    """Data coordinates of the latent (known_values on the mask, to_latent(x) off it)."""
    return from_latent(jnp.where(known, known_values, to_latent(x)))

  def project(x, t, keys):
    mean, std = sde.marginal_prob(observed, sampling.batch_times(t, observed))
    noise = sampling.example_normal(keys, example_shape, observed.dtype)
    return merge(mean + std * noise, x)

  return sampling.Projection(project=project, finish=lambda x: merge(observed, x))


def replacement_pc_sampler(key, score_fn: ScoreFn, sde, observed, mask, *,
                           to_latent: Callable = sampling.identity,
                           from_latent: Callable = sampling.identity,
                           predictor='reverse_diffusion', corrector='langevin', snr=0.16,
                           n_steps_each=1, snr_norm='example', noise_removal=True,
                           probability_flow=False, num_steps=0, eps=1e-3,
                           constrain: Callable = sampling.identity) -> tuple[jax.Array, Info]:
  """PC sampling with the known latent entries replaced after every update.

  The PC loop of `score_sde.sampling.pc_sampler` with `replacement_projection`
  (its keys: those of the PC loop, the projection's own as documented there).

  Args:
    key: PRNG key; example i depends only on (key, i).
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    sde: the forward SDE.
    observed: [B, ...] the observation y in latent coordinates (entries
      outside the mask are ignored).
    mask: [B, ...] 1 where the latent entry is known.
    to_latent / from_latent: an orthogonal change of coordinates and its
      inverse (identity for inpainting, the colour decoupling for
      colourisation).
    Other options: as `score_sde.sampling.pc_sampler`.

  Returns:
    (x [B, ...] in data coordinates with the known latent entries equal to
    `observed`, info {'nfe'}).
  """
  projection = replacement_projection(sde, observed, mask, to_latent=to_latent,
                                      from_latent=from_latent)
  return sampling.pc_sampler(
      key, score_fn, sde, observed.shape, predictor=predictor, corrector=corrector, snr=snr,
      n_steps_each=n_steps_each, snr_norm=snr_norm, noise_removal=noise_removal,
      probability_flow=probability_flow, num_steps=num_steps, eps=eps, constrain=constrain,
      projection=projection)


def _pc_options(sde, options: dict) -> dict:
  """Validated PC options (defaults filled in); raises on bad input."""
  unknown = sorted(set(options) - set(PC_OPTIONS))
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} for PC inpainting / colourisation; '
                     f'valid: {sorted(PC_OPTIONS)}.')
  _, opts = sampling.resolve_options(sde, 'pc', options)
  opts.pop('matmul_precision')          # not a PC_OPTIONS key: always the default
  return opts


def _batch_constraint(mesh, batch_size: int, what: str) -> Callable:
  if mesh is None:
    return sampling.identity
  parallel.check_batch_divisible(batch_size, mesh, what)
  sharding = parallel.batch_sharding(mesh)
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _jit(fn: Callable, mesh, num_params: int, num_batched: int) -> Callable:
  """jax.jit of fn(key, *params, *batched): batched inputs / outputs sharded on 'data'."""
  if mesh is None:
    return jax.jit(fn)
  rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep,) + (rep,) * num_params + (batch,) * num_batched,
                 out_shardings=(batch, rep))


# ----------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------

def build_inpainter(sde, score_model_fn, shape, mesh=None, **options) -> Callable:
  """Pure inpainter(key, params, images [B, ...], mask [B, ...]) -> (x, info), not jitted.

  score_model_fn(params, x, t) -> score. `images` in model space (values under
  mask 0 are ignored), `mask` binary with the images' shape (see `check_mask`
  to build one). Options: the PC options of `score_sde.sampling.sample`
  (predictor, corrector, snr, n_steps_each, snr_norm, noise_removal,
  probability_flow, num_steps, eps).
  """
  shape = sampling.check_shape(shape)
  opts = _pc_options(sde, options)
  constrain = _batch_constraint(mesh, shape[0], 'number of images')

  def inpainter(key, params, images, mask):
    check_images(images, shape)
    if tuple(mask.shape) != shape:
      raise ValueError(f'the mask has shape {list(mask.shape)}; inside a built inpainter it '
                       f'must have the images\' shape {list(shape)} (use check_mask).')
    score_fn = lambda x, t: score_model_fn(params, x, t)  # noqa: E731
    images = jnp.asarray(images, jnp.float32)
    return replacement_pc_sampler(key, score_fn, sde, images, mask, constrain=constrain,
                                  **opts)

  return inpainter


def jit_inpainter(inpainter: Callable, mesh=None) -> Callable:
  """jax.jit of inpainter(key, params, images, mask), images and mask sharded."""
  return _jit(inpainter, mesh, 1, 2)


@functools.lru_cache(maxsize=32)
def _cached_inpainter(score_fn, sde, shape, option_items, mesh):
  inpainter = build_inpainter(sde, lambda _, x, t: score_fn(x, t), shape, mesh,
                              **dict(option_items))
  return jit_inpainter(inpainter, mesh)


def inpaint(key, score_fn: ScoreFn, sde, images, mask, *, mesh=None,
            **options) -> tuple[jax.Array, Info]:
  """Fills in the entries where `mask` is 0, consistently with the rest.

  Args:
    key: PRNG key (example i depends only on (key, i)).
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    sde: the forward SDE.
    images: [B, ...] in model space; entries under mask 0 are ignored.
    mask: 1 = known, 0 = missing: [...] (one mask for all) or [B, ...]; for
      images also [H, W] (all channels alike). See `make_mask` for patterns.
    mesh: optional device mesh (batch sharded on 'data').
    **options: PC options (predictor, corrector, snr, n_steps_each,
      probability_flow, noise_removal, num_steps, eps).

  Returns:
    (inpainted [B, ...], info {'nfe'}). Known entries are returned unchanged.
  """
  images = jnp.asarray(images, jnp.float32)
  shape = sampling.check_shape(images.shape)
  mask = check_mask(mask, shape[1:], shape[0])
  fn = _cached_inpainter(score_fn, sde, shape, tuple(sorted(options.items())), mesh)
  return fn(key, None, images, jnp.asarray(mask))


# ----------------------------------------------------------------------------
# Colourisation
# ----------------------------------------------------------------------------

def check_grayscale(grey, image_shape) -> jax.Array:
  """Grey-scale images as [B, H, W, 1] for RGB outputs of `image_shape` [H, W, 3].

  Accepted: [B, H, W, 1], [B, H, W] or [B, H, W, 3] with equal channels.
  """
  image_shape = tuple(image_shape)
  if len(image_shape) != 3 or image_shape[-1] != 3:
    raise ValueError(f'colourisation needs an RGB model (images [H, W, 3]); this one makes '
                     f'{list(image_shape)} (config.data.num_channels must be 3).')
  shape = tuple(np.shape(grey))
  if len(shape) == 3:
    grey = jnp.asarray(grey)[..., None]
    shape = shape + (1,)
  if len(shape) != 4:
    raise ValueError(f'grey-scale images must be [B, H, W, 1] (or [B, H, W]); got shape '
                     f'{list(shape)}.')
  if shape[1:3] != image_shape[:2]:
    raise ValueError(f'grey-scale images are {shape[1]}x{shape[2]} but the model makes '
                     f'{image_shape[0]}x{image_shape[1]} images (config.data.image_size); '
                     f'resize them first.')
  if shape[-1] == 3:
    if not isinstance(grey, jax.core.Tracer):
      values = np.asarray(grey)
      if not (np.allclose(values[..., 0], values[..., 1], atol=1e-6)
              and np.allclose(values[..., 0], values[..., 2], atol=1e-6)):
        raise ValueError('the 3-channel input is not grey-scale (its channels differ); pass '
                         'to_grayscale(images) ([B, H, W, 1], the channel mean) to colourise '
                         'its grey levels.')
    grey = jnp.asarray(grey)[..., :1]
  elif shape[-1] != 1:
    raise ValueError(f'grey-scale images must have 1 channel (or 3 equal ones); got '
                     f'{shape[-1]} channels.')
  return jnp.asarray(grey, jnp.float32)


def grey_observation(grey: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(observed latent [B, H, W, 3] = (sqrt(3) grey, 0, 0), latent mask (1, 0, 0))."""
  observed = jnp.concatenate([math.sqrt(3.0) * grey, jnp.zeros_like(grey),
                              jnp.zeros_like(grey)], axis=-1)
  mask = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0], grey.dtype), observed.shape)
  return observed, mask


def build_colorizer(sde, score_model_fn, shape, mesh=None, **options) -> Callable:
  """Pure colorizer(key, params, grey [B, H, W, 1]) -> (rgb [B, H, W, 3], info), not jitted.

  `shape` is the output shape [B, H, W, 3]; grey in model space, the channel
  mean of the wanted colour image. Options as for `build_inpainter`.
  """
  shape = sampling.check_shape(shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'colourisation needs RGB images [B, H, W, 3]; got shape {list(shape)} '
                     f'(config.data.num_channels must be 3).')
  opts = _pc_options(sde, options)
  constrain = _batch_constraint(mesh, shape[0], 'number of images')

  def colorizer(key, params, grey):
    grey = check_grayscale(grey, shape[1:])
    if grey.shape[0] != shape[0]:
      raise ValueError(f'got {grey.shape[0]} grey-scale images; this colouriser was built '
                       f'for {shape[0]}.')
    observed, mask = grey_observation(grey)
    score_fn = lambda x, t: score_model_fn(params, x, t)  # noqa: E731
    return replacement_pc_sampler(key, score_fn, sde, observed, mask,
                                  to_latent=decouple_colors, from_latent=couple_colors,
                                  constrain=constrain, **opts)

  return colorizer


def jit_colorizer(colorizer: Callable, mesh=None) -> Callable:
  """jax.jit of colorizer(key, params, grey), grey sharded."""
  return _jit(colorizer, mesh, 1, 1)


@functools.lru_cache(maxsize=32)
def _cached_colorizer(score_fn, sde, shape, option_items, mesh):
  colorizer = build_colorizer(sde, lambda _, x, t: score_fn(x, t), shape, mesh,
                              **dict(option_items))
  return jit_colorizer(colorizer, mesh)


def colorize(key, score_fn: ScoreFn, sde, grey, *, mesh=None,
             **options) -> tuple[jax.Array, Info]:
  """Colour images whose channel mean is `grey` ([B, H, W, 1], model space).

  Returns (rgb [B, H, W, 3], info {'nfe'}); options as for `inpaint`.
  """
  grey_shape = np.shape(grey)
  if len(grey_shape) not in (3, 4):
    raise ValueError(f'grey-scale images must be [B, H, W, 1]; got shape {list(grey_shape)}.')
  shape = tuple(grey_shape[:3]) + (3,)
  grey = check_grayscale(grey, shape[1:])
  fn = _cached_colorizer(score_fn, sde, shape, tuple(sorted(options.items())), mesh)
  return fn(key, None, grey)


# ----------------------------------------------------------------------------
# Class-conditional sampling
# ----------------------------------------------------------------------------


def classifier_log_likelihood_grad(logits_fn: LogitsFn, x, t, labels) -> jax.Array:
  """grad_x log p(y_b | x_b, t) for every example b: [B, ...].

  log p = log_softmax(logits)[y]; the gradient of the batch sum is each
  example's own gradient because examples do not interact in the classifier.
  """
  def total_log_prob(x):
    log_probs = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

  return jax.grad(total_log_prob)(x)


def conditional_score_fn(score_fn: ScoreFn, logits_fn: LogitsFn, labels,
                         scale: float = 1.0) -> ScoreFn:
  """score(x, t) + scale * grad_x log p(y | x, t), the score of p_t(x | y) at scale 1."""
  labels = jnp.asarray(labels, jnp.int32)

  def cond_score(x, t):
    return score_fn(x, t) + scale * classifier_log_likelihood_grad(logits_fn, x, t, labels)

  return cond_score


def _check_scale(scale) -> float:
  scale = float(scale)
  if not (math.isfinite(scale) and scale >= 0):
    raise ValueError(f'the classifier scale must be a finite number >= 0 (1 = the exact '
                     f'conditional); got {scale}.')
  return scale


def build_conditional_sampler(sde, score_model_fn, logits_model_fn, shape, num_classes: int,
                              method: str = 'pc', mesh=None, scale: float = 1.0,
                              **options) -> Callable:
  """Pure sampler(key, score_params, classifier_params, labels [B]) -> (x, info), not jitted.

  score_model_fn(params, x, t) -> score; logits_model_fn(params, x, t) ->
  [B, num_classes]. Any method of `score_sde.sampling` ('pc' with every
  predictor / corrector, 'ddim', 'ode', 'sde') with its options; 'ode' and
  'sde' solve each example on its own (its label fixed), as they do anyway.
  """
  shape = sampling.check_shape(shape)
  scale = _check_scale(scale)
  spec, opts = sampling.resolve_options(sde, method, options)
  precision = opts.pop('matmul_precision')
  method = str(method).lower()
  per_example = method in ('ode', 'sde')
  constrain = _batch_constraint(mesh, shape[0], 'number of samples')

  def sampler(key, score_params, classifier_params, labels):
    with sampling.matmul_precision(precision):
      return conditional(key, score_params, classifier_params, labels)

  def conditional(key, score_params, classifier_params, labels):
    if tuple(labels.shape) != shape[:1]:
      raise ValueError(f'labels must have shape [{shape[0]}]; got {list(labels.shape)}.')
    score_fn = lambda x, t: score_model_fn(score_params, x, t)  # noqa: E731
    logits_fn = lambda x, t: logits_model_fn(classifier_params, x, t)  # noqa: E731
    found = num_classes_of(logits_fn, shape[1:])
    if found != num_classes:
      raise ValueError(f'the classifier returns {found} logits per example but '
                       f'num_classes = {num_classes}; build the sampler with its class count.')
    labels = jnp.asarray(labels, jnp.int32)
    if not per_example:
      cond = conditional_score_fn(score_fn, logits_fn, labels, scale)
      return spec.sampler(key, cond, sde, shape, constrain=constrain, **opts)

    def one_example(example_key, label):
      cond = conditional_score_fn(score_fn, logits_fn, label[None], scale)
      x, info = spec.sampler(example_key, cond, sde, (1,) + shape[1:], **opts)
      return x[0], info['nfe']

    keys = constrain(sampling.example_keys(key, shape[0]))
    x, nfe = jax.vmap(one_example)(keys, labels)
    return x, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe}

  return sampler


def jit_conditional_sampler(sampler: Callable, mesh=None) -> Callable:
  """jax.jit of sampler(key, score_params, classifier_params, labels), labels sharded."""
  return _jit(sampler, mesh, 2, 1)


@functools.lru_cache(maxsize=32)
def _cached_conditional(score_fn, logits_fn, sde, shape, num_classes, method, scale,
                        option_items, mesh):
  sampler = build_conditional_sampler(
      sde, lambda _, x, t: score_fn(x, t), lambda _, x, t: logits_fn(x, t), shape,
      num_classes, method, mesh, scale, **dict(option_items))
  return jit_conditional_sampler(sampler, mesh)


def num_classes_of(logits_fn: LogitsFn, example_shape) -> int:
  """K of a classifier logits_fn(x, t) -> [B, K], by shape inference."""
  x = jax.ShapeDtypeStruct((1,) + tuple(example_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  out = jax.eval_shape(logits_fn, x, t)
  if out.ndim != 2 or out.shape[0] != 1:
    raise ValueError(f'the classifier must return logits [B, K]; for a batch of 1 it '
                     f'returned shape {list(out.shape)}.')
  return int(out.shape[1])


def conditional_sample(key, score_fn: ScoreFn, logits_fn: LogitsFn, sde, shape, labels, *,
                       scale: float = 1.0, method: str = 'pc', mesh=None,
                       **options) -> tuple[jax.Array, Info]:
  """Samples of p(x | y) with the score score_fn + scale * grad log p(y | x_t).

  Args:
    key: PRNG key (example i depends only on (key, i)).
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    logits_fn: logits_fn(x [B, ...], t [B]) -> [B, K] (logits or log-probabilities
      of a noise-conditional classifier).
    sde: the forward SDE.
    shape: [B, ...] the batch of samples.
    labels: [B] class indices in [0, K), or one index for all.
    scale: classifier weight (1: exact conditional).
    method, mesh, **options: as `score_sde.sampling.sample`.

  Returns:
    (x [B, ...], info {'nfe'}).
  """
  shape = sampling.check_shape(shape)
  num_classes = num_classes_of(logits_fn, shape[1:])
  labels = losses.check_class_labels(labels, shape[0], num_classes)
  fn = _cached_conditional(score_fn, logits_fn, sde, shape, num_classes, str(method).lower(),
                           _check_scale(scale), tuple(sorted(options.items())), mesh)
  return fn(key, None, None, jnp.asarray(labels))
