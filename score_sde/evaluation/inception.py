"""Inception-v3 of the FID papers, in Flax: pool_3 features and class logits.

The network is the TF graph "inception-2015-12-05" that the FID (Heusel et al.
2017), TF-GAN and pytorch-fid codes use, not the torchvision Inception:

  uint8 x in [0, 255]  ->  bilinear resize to 299 x 299  ->  x / 127.5 - 1 in [-1, 1]
  -> stem (5 conv-BN-ReLU, 2 max-pools) -> Mixed_5b..5d (A) -> 6a (B) -> 6b..6e (C)
  -> 7a (D) -> 7b (E, average pool) -> 7c (E, *max* pool)
  -> global average pool: pool_3 [B, 2048] -> fc: logits [B, 1008]

Differences from torchvision's Inception-v3, all kept here: the 3x3 average
pools inside blocks A, C and E_1 exclude the zero padding from the mean
(TensorFlow's pooling); the pool branch of the last block (Mixed_7c) is a 3x3
*max* pool; there are 1008 output classes; no auxiliary head. Every conv is
conv (no bias) -> batch norm (inference statistics, eps 1e-3) -> ReLU.

Resizing. The TF graph resizes with TF1's `resize_bilinear(align_corners=False)`
(source coordinate = out index * in / out); pytorch-fid resizes with PyTorch's
half-pixel bilinear interpolation ((out + 0.5) * in / out - 0.5). Both are in
RESIZE_METHODS ('tf1' default, matching the TF FID / TF-GAN numbers such as the
reference's CIFAR-10 FIDs; 'pytorch' to compare with pytorch-fid numbers).
Grey-scale images (C = 1) are repeated to 3 channels.

Weights file (`.npz`, read with allow_pickle=False). One float32 array per
parameter, named by its path in the Flax parameter tree joined with '/':

  <layer>/kernel [kh, kw, c_in, c_out]   conv weights (HWIO)
  <layer>/scale, /bias, /mean, /var [c_out]   batch-norm gamma, beta, running stats
  fc/kernel [2048, 1008], fc/bias [1008]
  (e.g. 'Conv2d_1a_3x3/kernel', 'Mixed_7c/branch3x3dbl_3a/var')

plus string arrays 'meta/format' (= WEIGHTS_FORMAT) and 'meta/source'. Layer
names are those of the PyTorch port, so a pytorch-fid state-dict key
'Mixed_5b.branch5x5_1.bn.running_var' becomes 'Mixed_5b/branch5x5_1/var'.

Making the weights file (once, on a machine with internet and torch; torch is
not a dependency of this package):

  pip install torch numpy
  curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m score_sde.evaluation.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

then copy inception_fid.npz to the machine that evaluates and pass its path (or
set $SCORE_SDE_INCEPTION_WEIGHTS, or put it at ~/.cache/score_sde/inception_fid.npz).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from score_sde import io
from score_sde import parallel
from score_sde.evaluation import metrics

NUM_CLASSES = 1008
POOL_DIM = 2048
IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75          # smallest input the stride pattern accepts
BN_EPS = 1e-3
WEIGHTS_FORMAT = 'score_sde/inception_v3_fid/v1'
WEIGHTS_ENV = 'SCORE_SDE_INCEPTION_WEIGHTS'
DEFAULT_WEIGHTS = '~/.cache/score_sde/inception_fid.npz'
PYTORCH_FID_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
_HIGHEST = lax.Precision.HIGHEST   # float32 convs also on TPU (default there is bf16 passes)


class WeightsError(ValueError):
  """The Inception weights file is missing, unreadable or does not fit the network."""


# ----------------------------------------------------------------------------
# Resizing: bilinear interpolation as two small matrices (jittable, exact)
# ----------------------------------------------------------------------------

def _source_tf1(out_size: int, in_size: int) -> np.ndarray:
  """TF1 resize_bilinear(align_corners=False): src = dst * in / out."""
  return np.arange(out_size) * (in_size / out_size)


def _source_pytorch(out_size: int, in_size: int) -> np.ndarray:
  """PyTorch interpolate(align_corners=False): src = (dst + 0.5) in / out - 0.5, >= 0."""
  return np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)


RESIZE_METHODS = {'tf1': _source_tf1, 'pytorch': _source_pytorch}


def _check_resize_method(method: str) -> None:
  if method not in RESIZE_METHODS:
    raise ValueError(f'unknown resize method {method!r}; valid: {sorted(RESIZE_METHODS)} '
                     f"('tf1' as the TF FID graph, 'pytorch' as pytorch-fid).")


def interpolation_matrix(out_size: int, in_size: int, method: str = 'tf1') -> np.ndarray:
  """[out_size, in_size] float32 matrix R with (R v)[o] the bilinear sample at o."""
  _check_resize_method(method)
  src = RESIZE_METHODS[method](out_size, in_size)
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - frac)
  np.add.at(matrix, (rows, upper), frac)
  return matrix.astype(np.float32)


def preprocess(images: jax.Array, image_size: int = IMAGE_SIZE,
               resize_method: str = 'tf1') -> jax.Array:
  """uint8 [B, H, W, C] (C = 1 or 3), values 0..255 -> float32 [B, S, S, 3] in [-1, 1]."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [batch, height, width, channels] with 1 or 3 '
                     f'channels; got shape {tuple(images.shape)}.')
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  resize_h = jnp.asarray(interpolation_matrix(image_size, x.shape[1], resize_method))
  resize_w = jnp.asarray(interpolation_matrix(image_size, x.shape[2], resize_method))
  x = jnp.einsum('oh,bhwc->bowc', resize_h, x, precision=_HIGHEST)
  return jnp.einsum('pw,bowc->bopc', resize_w, x, precision=_HIGHEST)


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------

class ConvBN(nn.Module):
  """conv (no bias, symmetric zero padding) -> batch norm (running stats) -> ReLU."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (kh, kw, x.shape[-1], self.features))
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    gain = scale * lax.rsqrt(var + BN_EPS)            # batch norm folded into the conv
    (ph, pw) = self.padding
    y = lax.conv_general_dilated(
        x, kernel * gain, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
    return nn.relu(y + (bias - mean * gain))


def _avg_pool_3x3(x):
  """3x3, stride 1, 'same' average excluding the padding (TensorFlow's)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1, pad: int = 1):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, name='branch1x1')(x)
    b5 = ConvBN(48, name='branch5x5_1')(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = ConvBN(64, name='branch3x3dbl_1')(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = ConvBN(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = ConvBN(64, name='branch3x3dbl_1')(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = ConvBN(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Factorised 7x7 convolutions at 17 x 17."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = ConvBN(192, name='branch1x1')(x)
    b7 = ConvBN(c7, name='branch7x7_1')(x)
    b7 = ConvBN(c7, **row, name='branch7x7_2')(b7)
    b7 = ConvBN(192, **col, name='branch7x7_3')(b7)
    bd = ConvBN(c7, name='branch7x7dbl_1')(x)
    bd = ConvBN(c7, **col, name='branch7x7dbl_2')(bd)
    bd = ConvBN(c7, **row, name='branch7x7dbl_3')(bd)
    bd = ConvBN(c7, **col, name='branch7x7dbl_4')(bd)
    bd = ConvBN(192, **row, name='branch7x7dbl_5')(bd)
    bp = ConvBN(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, name='branch3x3_1')(x)
    b3 = ConvBN(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = ConvBN(192, name='branch7x7x3_1')(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = ConvBN(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Expanded filter bank at 8 x 8; `max_pool` selects the FID graph's Mixed_7c."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = ConvBN(320, name='branch1x1')(x)
    b3 = ConvBN(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([ConvBN(384, **row, name='branch3x3_2a')(b3),
                          ConvBN(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = ConvBN(448, name='branch3x3dbl_1')(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([ConvBN(384, **row, name='branch3x3dbl_3a')(bd),
                          ConvBN(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = ConvBN(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """x: float32 [B, S, S, 3] in [-1, 1], S >= 75 -> (pool_3 [B, 2048], logits [B, 1008])."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)           # 149
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)                     # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)     # 147
    x = _max_pool_3x3(x, stride=2, pad=0)                               # 73
    x = ConvBN(80, name='Conv2d_3b_1x1')(x)
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)                    # 71
    x = _max_pool_3x3(x, stride=2, pad=0)                               # 35
    x = InceptionA(32, name='Mixed_5b')(x)                              # 256
    x = InceptionA(64, name='Mixed_5c')(x)                              # 288
    x = InceptionA(64, name='Mixed_5d')(x)                              # 288
    x = InceptionB(name='Mixed_6a')(x)                                  # 768 @ 17
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)                                  # 1280 @ 8
    x = InceptionE(name='Mixed_7b')(x)                                  # 2048
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)                   # 2048
    pool = jnp.mean(x, axis=(1, 2))                                     # [B, 2048]
    logits = nn.Dense(self.num_classes, name='fc', precision=_HIGHEST)(pool)
    return pool, logits


# ----------------------------------------------------------------------------
# Parameters: random initialisation, the npz file, conversion from PyTorch
# ----------------------------------------------------------------------------

def init_params(key: jax.Array) -> dict:
  """Random parameters for tests: He-normal kernels, identity batch norms, zero fc bias.

  Drawn as one normal vector cut into the kernels (initialising the 472 arrays
  one by one, or jitting the network's `init`, takes tens of seconds on CPU).
  """
  shapes = param_shapes()
  kernels = sorted(k for k in shapes if k.endswith('kernel'))
  sizes = [math.prod(shapes[k]) for k in kernels]
  normal = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
  flat, offset = {}, 0
  for name, size in zip(kernels, sizes):
    shape = shapes[name]
    fan_in = math.prod(shape[:-1])
    flat[name] = normal[offset:offset + size].reshape(shape) * np.float32(math.sqrt(2 / fan_in))
    offset += size
  for name, shape in shapes.items():
    if name not in flat:
      filled = 1.0 if name.endswith(('scale', 'var')) else 0.0
      flat[name] = np.full(shape, filled, np.float32)
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep='/')


@functools.cache
def param_shapes() -> dict:
  """{'Conv2d_1a_3x3/kernel': (3, 3, 3, 32), ...}: every parameter the network needs."""
  dummy = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), dummy)['params']
  return {k: tuple(v.shape) for k, v in flatten_params(abstract).items()}


def flatten_params(params) -> dict:
  """Nested parameter tree -> {'a/b/c': array}."""
  return traverse_util.flatten_dict(params, sep='/')


def save_params(path: str, params, source: str = 'random initialisation') -> str:
  """Writes the weights file (format in the module docstring); returns the path."""
  arrays = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
  check_param_shapes(arrays, path)
  return io.savez_atomic(path, **arrays, **{'meta/format': np.str_(WEIGHTS_FORMAT),
                                                 'meta/source': np.str_(source)})


def check_param_shapes(arrays: Mapping[str, np.ndarray], where: str) -> None:
  """Raises WeightsError naming missing / unexpected keys and wrong shapes."""
  expected = param_shapes()
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise WeightsError(
        f'{where} does not hold the FID Inception-v3 parameters: missing '
        f'{len(missing)} key(s) {missing[:5]}{" ..." if len(missing) > 5 else ""}, '
        f'unexpected {len(unexpected)} key(s) {unexpected[:5]}'
        f'{" ..." if len(unexpected) > 5 else ""}. Make the file with '
        f'`python -m score_sde.evaluation.inception <pytorch-fid .pth> <out.npz>`.')
  for key, shape in expected.items():
    value = np.asarray(arrays[key])
    if tuple(value.shape) != shape:
      raise WeightsError(f'{where}: parameter {key!r} has shape {tuple(value.shape)}, '
                         f'expected {shape}. The file was not made for this network; '
                         f're-convert it with `python -m score_sde.evaluation.inception '
                         f'<pytorch-fid .pth> <out.npz>`.')
    if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
      raise WeightsError(f'{where}: parameter {key!r} is not a finite floating-point array '
                         f'(dtype {value.dtype}); the file is corrupt, re-convert it.')


def default_weights_path() -> str:
  """$SCORE_SDE_INCEPTION_WEIGHTS, else ~/.cache/score_sde/inception_fid.npz."""
  return os.path.expanduser(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS)


def _missing_weights_message(path: str) -> str:
  return (f'Inception weights file {path} does not exist. Weights are not downloaded '
          f'automatically; on a machine with internet access and torch installed run\n'
          f'  curl -LO {PYTORCH_FID_URL}\n'
          f'  python -m score_sde.evaluation.inception pt_inception-2015-12-05-6726825d.pth '
          f'inception_fid.npz\n'
          f'then copy inception_fid.npz here and pass its path (or set ${WEIGHTS_ENV}).')


def load_params(path: str | None = None) -> dict:
  """Parameters from a weights file (default: `default_weights_path()`), shape-checked."""
  path = default_weights_path() if path is None else os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path))
  arrays = io.load_npz_plain(path, 'Inception weights', error=WeightsError)
  fmt = str(arrays.pop('meta/format', ''))
  arrays.pop('meta/source', None)
  if fmt and fmt != WEIGHTS_FORMAT:
    raise WeightsError(f'{path} has format {fmt!r}, expected {WEIGHTS_FORMAT!r}.')
  check_param_shapes(arrays, path)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  return traverse_util.unflatten_dict(params, sep='/')


# PyTorch (pytorch-fid / torchvision) parameter name -> our name; conv weights
# [out, in, kh, kw] -> [kh, kw, in, out], linear [out, in] -> [in, out].
_TORCH_SUFFIXES = {
    'conv.weight': 'kernel', 'bn.weight': 'scale', 'bn.bias': 'bias',
    'bn.running_mean': 'mean', 'bn.running_var': 'var',
}
_TORCH_IGNORED = ('num_batches_tracked', 'AuxLogits.')


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid state dict (name -> numpy array) -> {our key: float32 array}.

  Pure numpy (no torch needed); the result passes `check_param_shapes`.
  """
  arrays = {}
  for name, value in state_dict.items():
    if any(part in name for part in _TORCH_IGNORED):
      continue
    value = np.asarray(value, np.float32)
    if name == 'fc.weight':
      arrays['fc/kernel'] = value.T
      continue
    if name == 'fc.bias':
      arrays['fc/bias'] = value
      continue
    layer, _, suffix = name.rpartition('.')
    layer, _, module = layer.rpartition('.')
    ours = _TORCH_SUFFIXES.get(f'{module}.{suffix}')
    if ours is None:
      raise WeightsError(f'state-dict entry {name!r} is not an Inception-v3 parameter '
                         f'(expected names ending in {sorted(_TORCH_SUFFIXES)} or fc.*).')
    if ours == 'kernel':
      value = value.transpose(2, 3, 1, 0)
    arrays[f'{layer.replace(".", "/")}/{ours}'] = value
  check_param_shapes(arrays, 'the converted state dict')
  return arrays


def convert_pytorch_fid_weights(pth_path: str, npz_path: str) -> str:
  """Converts pytorch-fid's pt_inception-2015-12-05-6726825d.pth to our npz. Needs torch."""
  try:
    import torch
  except ImportError:
    raise ImportError('converting the .pth file needs PyTorch (`pip install torch`), on any '
                      'machine; the resulting .npz needs no torch.') from None
  try:
    state_dict = torch.load(pth_path, map_location='cpu', weights_only=True)
  except TypeError:                      # torch < 1.13 has no weights_only
    raise ImportError(f'torch {torch.__version__} cannot load {pth_path} without unpickling '
                      f'arbitrary code (torch.load has no weights_only before 1.13); '
                      f'upgrade torch (`pip install -U torch`) to convert it.') from None
  arrays = convert_torch_state_dict({k: v.detach().cpu().numpy()
                                     for k, v in state_dict.items()})
  params = traverse_util.unflatten_dict(arrays, sep='/')
  return save_params(npz_path, params, source=os.path.basename(pth_path))


def weights_fingerprint(params) -> str:
  """Short hash of all parameter values: identifies the weights in statistics files."""
  return metrics.params_fingerprint(params)


# ----------------------------------------------------------------------------
# Feature extraction (jitted, optionally sharded over a mesh)
# ----------------------------------------------------------------------------

def _check_image_size(image_size: int) -> None:
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'image_size={image_size} is too small for Inception-v3; use at '
                     f'least {MIN_IMAGE_SIZE} (the FID standard is {IMAGE_SIZE}).')


def _forward(params, images, *, image_size: int, resize_method: str):
  x = preprocess(images, image_size, resize_method)
  return InceptionV3().apply({'params': params}, x)


@functools.lru_cache(maxsize=None)
def _compiled(mesh, image_size: int, resize_method: str):
  fn = functools.partial(_forward, image_size=image_size, resize_method=resize_method)
  if mesh is None:
    return jax.jit(fn)
  rows = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), rows),
                 out_shardings=(rows, rows))


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate_params(params, mesh=None):
  """Parameters placed on every device of `mesh` (once, before many `features` calls)."""
  if mesh is None:
    return jax.device_put(params)
  return jax.device_put(params, parallel.replicated(mesh))


def features(params, images, *, mesh=None, image_size: int = IMAGE_SIZE,
             resize_method: str = 'tf1') -> tuple[np.ndarray, np.ndarray]:
  """(pool_3 [B, 2048], logits [B, 1008]) float32 of uint8 images [B, H, W, C].

  With a mesh the batch is split over its 'data' axis (B must divide by the
  device count; every process passes the same global batch) and the outputs
  are gathered to every process.
  """
  _check_image_size(image_size)
  _check_resize_method(resize_method)
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 values 0..255; got dtype {images.dtype} '
                     f'(convert with np.clip(np.round(x01 * 255), 0, 255).astype(np.uint8)).')
  fn = _compiled(mesh, image_size, resize_method)
  if mesh is not None:
    parallel.check_batch_divisible(images.shape[0], mesh, 'feature batch size')
    sharding = parallel.batch_sharding(mesh)
    images = jax.make_array_from_callback(images.shape, sharding, lambda index: images[index])
  pool, logits = fn(params, images)
  return _to_host(pool), _to_host(logits)


def feature_network(params, *, mesh=None, batch_size: int = 200, image_size: int = IMAGE_SIZE,
                    resize_method: str = 'tf1'):
  """A `metrics.FeatureNetwork` of these weights: uint8 batches of any size -> features.

  Batches are cut / zero-padded to `batch_size` rows so one compilation serves
  all calls. The name records the weights' fingerprint and the resize method,
  so statistics made with other weights or resizing are refused.
  """
  _check_image_size(image_size)
  _check_resize_method(resize_method)
  if mesh is not None:
    parallel.check_batch_divisible(batch_size, mesh, 'feature batch size')
  name = f'inception_v3_fid_pool3/{resize_method}/{image_size}/{weights_fingerprint(params)}'
  placed = replicate_params(params, mesh)

  def apply(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return metrics.apply_in_fixed_batches(
        lambda chunk: features(placed, chunk, mesh=mesh, image_size=image_size,
                               resize_method=resize_method), images, batch_size)

  return metrics.FeatureNetwork(name=name, apply=apply, feature_dim=POOL_DIM,
                                num_classes=NUM_CLASSES)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m score_sde.evaluation.inception',
      description='Convert pytorch-fid Inception weights (.pth) to the score_sde .npz format '
                  f'(needs torch). The .pth is at {PYTORCH_FID_URL}')
  parser.add_argument('pth', help='pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('npz', nargs='?', default=default_weights_path(),
                      help=f'output path (default {default_weights_path()})')
  args = parser.parse_args(argv)
  if not os.path.isfile(args.pth):
    parser.error(f'{args.pth} does not exist; download it from {PYTORCH_FID_URL}')
  try:
    path = convert_pytorch_fid_weights(args.pth, args.npz)
  except (ImportError, WeightsError) as error:
    parser.error(str(error))
  print(f'wrote {path} (fingerprint {weights_fingerprint(load_params(path))})')


if __name__ == '__main__':
  main()
