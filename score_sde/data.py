"""Datasets: tensorflow-datasets data sources, grain loaders, scalers.

Images travel one path for every dataset: a tfds ArrayRecord data source
(random access, no TensorFlow at training time) -> per-example decode, crop and
resize -> optional random flip and uniform dequantisation -> the scaler ->
per-process slice of each global batch -> batches of float32 [b, H, W, C].

Pixel values. A dataset records its number of quantisation levels L (256 for
8-bit images, 17 for the digits, whose pixels are 0..16). Without
dequantisation a pixel k becomes k / (L - 1) in [0, 1]; with it, (k + U) / L,
U ~ U[0, 1) (the reference's (x 255 + U) / 256 for L = 256). The scaler then
maps [0, 1] to [-1, 1] when `config.data.centered`.

The embedded default dataset DIGITS is scikit-learn's bundled 8x8 handwritten
digits (1797 images, no download), prepared on first use as the local tfds
dataset `score_sde_digits` (train: sklearn indices 0..1499, test: 1500..1796).

Reproducibility and sharding. Every random choice (epoch order, flip,
dequantisation noise) is a function of the seed and the example's position in
the *global* stream, so a process reading rows [p b, (p+1) b) of each global
batch of B = P b rows sees exactly what a single process would put there, and
the iterator state (one integer) restores the stream exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Iterator

import numpy as np

# grain (and tensorflow_datasets) are imported where a loader or source is built, so
# that the library's steps, samplers and benchmarks/device_check.py import on a
# host that has neither.

DEFAULT_DATA_DIR_ENV = 'TFDS_DATA_DIR'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset from tfds."""
  tfds_name: str
  splits: dict                 # our split name -> tfds split
  shape: tuple                 # native [H, W, C]
  num_levels: int = 256
  crop: int = 0                # central square crop before resizing (0: none)
  prepare: str = ''            # what to run on a connected machine
  manual: str = ''             # where manual-download files go


_PREP = ("pip install tensorflow-cpu tensorflow-datasets && python -c \"import "
         "tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}')"
         ".download_and_prepare(file_format='array_record')\"")

IMAGE_DATASETS = {
    'CIFAR10': DatasetSpec('cifar10', {'train': 'train', 'test': 'test'}, (32, 32, 3)),
    'SVHN': DatasetSpec('svhn_cropped', {'train': 'train', 'test': 'test'}, (32, 32, 3)),
    'CELEBA': DatasetSpec('celeb_a', {'train': 'train', 'test': 'validation'},
                          (218, 178, 3), crop=140),
    'LSUN': DatasetSpec('lsun/{category}', {'train': 'train', 'test': 'validation'},
                        (0, 0, 3)),
    'CELEBAHQ': DatasetSpec('celeb_a_hq/{image_size}', {'train': 'train', 'test': 'train'},
                            (0, 0, 3),
                            manual='the CelebA-HQ files made by the progressive-GAN '
                                   'scripts (see tfds celeb_a_hq documentation)'),
    'FFHQ': DatasetSpec('score_sde_image_folder/ffhq', {'train': 'train', 'test': 'train'},
                        (0, 0, 3),
                        manual='the FFHQ PNG images (github.com/NVlabs/ffhq-dataset)'),
    'DIGITS': DatasetSpec('score_sde_digits', {'train': 'train', 'test': 'test'},
                          (8, 8, 1), num_levels=17),
}
TOY_DATASETS = ('TOY_MIXTURE', 'CHECKERBOARD', 'MOONS')


class DatasetNotFoundError(RuntimeError):
  """The dataset is not prepared in the data directory; the message says how."""


# ----------------------------------------------------------------------------
# Names, directories, specs
# ----------------------------------------------------------------------------

def data_dir(config) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  path = config.data.get('data_dir', '') or os.environ.get(DEFAULT_DATA_DIR_ENV, '')
  return os.path.expanduser(path or '~/tensorflow_datasets')


def dataset_name(config) -> str:
  name = config.data.dataset.upper()
  if name not in IMAGE_DATASETS and name not in TOY_DATASETS:
    raise ValueError(f'unknown dataset {config.data.dataset!r} (config.data.dataset); '
                     f'valid: {sorted(IMAGE_DATASETS) + list(TOY_DATASETS)}.')
  return name


def tfds_split(config, split: str) -> str:
  """The tfds split that our split name reads ('test' -> 'test' for the image datasets
  as shipped; benchmarks/flows_validation.py maps it to held-out training digits)."""
  name = dataset_name(config)
  if name not in IMAGE_DATASETS:
    return split
  splits = IMAGE_DATASETS[name].splits
  if split not in splits:
    raise ValueError(f'unknown split {split!r} for {name}; valid: {sorted(splits)}.')
  return splits[split]


def example_ranges(config, spec: str, prepared=None) -> list[tuple[str, int, int]]:
  """[(prepared split, first, end)]: the examples a tfds split spec ('train[:-300]',
  'train+test') reads, as index ranges of the dataset's prepared splits. A toy
  dataset's splits are drawn separately: [(spec, 0, 1)]. prepared: the dataset's tfds
  split infos (read from its source when None)."""
  import tensorflow_datasets as tfds
  if is_toy(config):
    return [(spec, 0, 1)]
  if prepared is None:
    prepared = prepared_splits(config)
  ranges = []
  for part in tfds.core.ReadInstruction.from_spec(spec).to_absolute(prepared):
    total = prepared[part.splitname].num_examples
    ranges.append((part.splitname, part.from_ or 0, total if part.to is None else part.to))
  return ranges


def prepared_splits(config):
  """The tfds split infos of the config's image dataset (names -> num_examples)."""
  return get_data_source(config, 'train').dataset_info.splits


def shared_examples(config, spec_a: str, spec_b: str) -> int:
  """How many examples two tfds split specs both read (0: disjoint)."""
  prepared = None if is_toy(config) else prepared_splits(config)
  ranges_b = example_ranges(config, spec_b, prepared)
  return sum(max(0, min(a_end, b_end) - max(a_first, b_first))
             for a_name, a_first, a_end in example_ranges(config, spec_a, prepared)
             for b_name, b_first, b_end in ranges_b
             if a_name == b_name)


def is_toy(config) -> bool:
  return dataset_name(config) in TOY_DATASETS


def num_levels(config) -> int:
  """Quantisation levels of the dataset's pixels (0 for continuous toy data)."""
  name = dataset_name(config)
  return 0 if name in TOY_DATASETS else IMAGE_DATASETS[name].num_levels


def _tfds_name(config, spec: DatasetSpec) -> str:
  return spec.tfds_name.format(category=config.data.get('category', 'bedroom'),
                               image_size=config.data.image_size)


def check_config_matches_dataset(config) -> None:
  """Fails early (before any compilation) when config.data contradicts the dataset."""
  name = dataset_name(config)
  if name in TOY_DATASETS:
    if not config.data.get('dim', 0):
      raise ValueError(f'toy dataset {name} needs config.data.dim (e.g. 2).')
    return
  channels = IMAGE_DATASETS[name].shape[2]
  if config.data.num_channels != channels:
    raise ValueError(f'config.data.num_channels={config.data.num_channels} but {name} '
                     f'images have {channels} channel(s); set config.data.num_channels='
                     f'{channels}.')
  native = IMAGE_DATASETS[name].shape[0]
  if name == 'DIGITS' and config.data.image_size != native:
    raise ValueError(f'config.data.image_size={config.data.image_size} but DIGITS images '
                     f'are {native}x{native}; set config.data.image_size={native}.')


# ----------------------------------------------------------------------------
# The embedded digits dataset (a local tfds builder, prepared without TF)
# ----------------------------------------------------------------------------

DIGITS_TRAIN_SIZE = 1500


@functools.cache
def _digits_builder_class():
  import tensorflow_datasets as tfds

  class ScoreSdeDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits; pixels 0..16 (17 levels)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description='scikit-learn 8x8 digits (UCI optical recognition of handwritten '
                      'digits, test part); train = indices 0..1499, test = 1500..1796.',
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
              'label': tfds.features.ClassLabel(num_classes=10)}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, DIGITS_TRAIN_SIZE),
              'test': self._generate_examples(DIGITS_TRAIN_SIZE, None)}

    def _generate_examples(self, start, stop):
      from sklearn.datasets import load_digits
      digits = load_digits()
      images = digits.images.astype(np.uint8)[..., None]
      for i in range(start, len(images) if stop is None else stop):
        yield i, {'image': images[i], 'label': int(digits.target[i])}

  return ScoreSdeDigits


def prepare_digits(directory: str) -> None:
  """Builds the digits dataset under `directory` if it is not there yet."""
  builder = _digits_builder_class()(data_dir=directory, file_format='array_record')
  builder.download_and_prepare()


# ----------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------

def get_data_source(config, split: str):
  """Random-access source of examples (dicts with 'image', 'label') of one split."""
  import tensorflow_datasets as tfds
  name = dataset_name(config)
  if name in TOY_DATASETS:
    return toy_split(config, split)
  spec = IMAGE_DATASETS[name]
  source_split = tfds_split(config, split)
  directory = data_dir(config)
  if name == 'DIGITS':
    prepare_digits(directory)
  tfds_name = _tfds_name(config, spec)
  if not glob.glob(os.path.join(directory, tfds_name, '*', 'dataset_info.json')):
    raise DatasetNotFoundError(_missing_message(name, tfds_name, directory, spec, None))
  try:
    return tfds.data_source(tfds_name, split=source_split, data_dir=directory,
                            download=False)
  except Exception as error:  # tfds raises several types for "not prepared"
    raise DatasetNotFoundError(_missing_message(name, tfds_name, directory, spec, error)) from None


def _missing_message(name, tfds_name, directory, spec, error) -> str:
  reason = ('' if error is None else
            f' ({type(error).__name__}: {str(error).splitlines()[0][:200]})')
  lines = [f'dataset {name} (tfds {tfds_name!r}) is not prepared in {directory}{reason}.']
  if spec.manual:
    lines.append(f'It needs a manual download: put {spec.manual} in '
                 f'{directory}/downloads/manual/, then on a machine with TensorFlow run:')
  else:
    lines.append('Prepare it once on a connected machine (TensorFlow is needed only '
                 'for this step), then copy the folder here or set config.data.data_dir:')
  lines.append('  ' + _PREP.format(name=tfds_name, data_dir=directory))
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Per-example transforms (numpy; deterministic given an rng)
# ----------------------------------------------------------------------------

def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  size = min(size, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased bilinear resize of a uint8 [H, W, C] image to [size, size, C]."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  from PIL import Image
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=None))
  return out.reshape(size, size, channels)


def decode_image(config, example) -> np.ndarray:
  """uint8 [H, W, C] image of `example`, cropped and resized as the config asks."""
  name = dataset_name(config)
  spec = IMAGE_DATASETS[name]
  image = np.asarray(example['image'])
  if image.ndim == 2:
    image = image[..., None]
  if spec.crop:
    image = _center_crop(image, spec.crop)
  elif image.shape[0] != image.shape[1]:
    image = _center_crop(image, min(image.shape[:2]))
  return _resize(image, config.data.image_size)


def to_unit_interval(image_uint: np.ndarray, levels: int, rng=None) -> np.ndarray:
  """k / (L - 1), or (k + U) / L with U ~ U[0, 1) when an rng is given."""
  image = image_uint.astype(np.float32)
  if rng is None:
    return image / (levels - 1)
  return (image + rng.uniform(size=image.shape).astype(np.float32)) / levels


def get_data_scaler(config):
  """[0, 1] -> model space ([-1, 1] when config.data.centered)."""
  if config.data.centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(config):
  """Model space -> [0, 1]."""
  if config.data.centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


def _example_transform(config, *, flip: bool, dequantize: bool):
  """(example, rng) -> float32 model-space array, optionally flipped / dequantised."""
  scaler = get_data_scaler(config)
  levels = num_levels(config)

  def transform(example, rng: np.random.Generator):
    if levels == 0:                         # continuous toy data: already in model space
      return np.asarray(example['image'], np.float32)
    image = decode_image(config, example)
    if flip and rng.uniform() < 0.5:
      image = image[:, ::-1]
    return scaler(to_unit_interval(image, levels, rng if dequantize else None)).astype(np.float32)

  return transform


# ----------------------------------------------------------------------------
# Toy 2-D / low-dimensional data
# ----------------------------------------------------------------------------

TOY_SIZES = {'train': 100_000, 'test': 10_000}


def toy_mixture(dim: int):
  """The toy mixture: 8 Gaussians on a circle of radius 2 (dims >= 2), std 0.2."""
  from score_sde import analytic
  angles = 2 * np.pi * np.arange(8) / 8
  means = np.zeros((8, dim))
  means[:, 0], means[:, 1 % dim] = 2 * np.cos(angles), 2 * np.sin(angles)
  return analytic.GaussianMixture.create(np.ones(8), means, np.full((8, dim), 0.04))


@functools.cache
def _toy_array(name: str, dim: int, split: str, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
  n = TOY_SIZES[split]
  if name == 'TOY_MIXTURE':
    import jax
    x = np.asarray(toy_mixture(dim).sample(jax.random.PRNGKey(int(rng.integers(2**31))), n))
  elif name == 'CHECKERBOARD':
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + np.floor(x1) % 2
    x = np.stack([x1, x2], 1)
  else:  # MOONS
    from sklearn.datasets import make_moons
    x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    x = (x - np.array([0.5, 0.25])) * 1.5
  if x.shape[1] != dim:
    raise ValueError(f'{name} is {x.shape[1]}-dimensional; set config.data.dim={x.shape[1]}.')
  return x.astype(np.float32)


def toy_split(config, split: str):
  """A list-like source of {'image': vector} examples of a toy dataset."""
  if split not in TOY_SIZES:
    raise ValueError(f'unknown split {split!r}; valid: {sorted(TOY_SIZES)}.')
  array = _toy_array(dataset_name(config), int(config.data.dim), split, 1234)
  return _ArraySource(array)


class _ArraySource:
  """Random access over the rows of an array, as {'image': row}."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def __len__(self) -> int:
    return len(self._array)

  def __getitem__(self, index):
    return {'image': self._array[index]}


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

class _GlobalStream:
  """Position i of the global training stream: epoch order, flip, dequantisation.

  Picklable, so grain may read it from worker processes.
  """

  def __init__(self, config, source, seed: int, augment: bool = True,
               with_labels: bool = False):
    self._config = config
    self._source = source
    self._seed = seed
    self._with_labels = with_labels
    self._transform = _example_transform(
        config, flip=augment and config.data.random_flip,
        dequantize=config.data.uniform_dequantization)
    import grain
    self._order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()

  def __len__(self):
    return len(self._order)

  def __getitem__(self, position: int):
    rng = np.random.default_rng([self._seed, 1, position])
    example = self._source[int(self._order[position])]
    image = self._transform(example, rng)
    if self._with_labels:
      return {'image': image, 'label': np.int32(example['label'])}
    return image


class _ProcessSlice:
  """Rows [p b, (p+1) b) of every global batch of B = P b rows of a stream."""

  def __init__(self, stream, global_batch: int, process_index: int, process_count: int):
    self._stream = stream
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._length = len(stream) // global_batch * self._local

  def __len__(self):
    return self._length

  def __getitem__(self, index: int):
    batch, row = divmod(index, self._local)
    return self._stream[batch * self._global + self._offset + row]


def _check_batch(global_batch: int, process_count: int):
  if global_batch % process_count:
    raise ValueError(f'the global batch size {global_batch} does not divide by the number '
                     f'of processes {process_count}.')


def train_iterator(config, *, global_batch_size: int, seed: int, split: str = 'train',
                   process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                   augment: bool = True, with_labels: bool = False):
  """Endless iterator of this process's [b, ...] float32 slices of global batches
  (with_labels: dicts {'image': [b, ...] float32, 'label': [b] int32}).

  Shuffled anew each epoch; random flips when `augment` and config.data.random_flip;
  dequantised when config.data.uniform_dequantization. The returned grain
  iterator has get_state() / set_state() for checkpoints.
  """
  import grain
  _check_batch(global_batch_size, process_count)
  source = get_data_source(config, split)
  if with_labels and (is_toy(config) or 'label' not in source[0]):
    raise ValueError(f'dataset {config.data.dataset!r} has no class labels; a classifier '
                     f'needs a labelled dataset (e.g. digits, CIFAR10).')
  stream = _GlobalStream(config, source, seed, augment, with_labels)
  local = _ProcessSlice(stream, global_batch_size, process_index, process_count)
  dataset = grain.MapDataset.source(local).batch(global_batch_size // process_count,
                                                 drop_remainder=True)
  options = grain.multiprocessing.MultiprocessingOptions(num_workers=worker_count)
  return iter(dataset.to_iter_dataset().mp_prefetch(options) if worker_count
              else dataset.to_iter_dataset())


def eval_batches(config, split: str, *, batch_size: int, start: int = 0,
                 stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images [batch, ...] float32 model space, valid mask [batch]) over examples
  [start, stop) of a split in order, the last batch padded (mask False).

  No flip, no dequantisation (bpd jobs dequantise with their own keys).
  """
  source = get_data_source(config, split)
  stop = len(source) if stop is None else min(stop, len(source))
  transform = _example_transform(config, flip=False, dequantize=False)
  for begin in range(start, stop, batch_size):
    rows = [transform(source[i], None) for i in range(begin, min(begin + batch_size, stop))]
    valid = np.zeros(batch_size, bool)
    valid[:len(rows)] = True
    rows += [np.zeros_like(rows[0])] * (batch_size - len(rows))
    yield np.stack(rows), valid


def split_size(config, split: str) -> int:
  return len(get_data_source(config, split))


def load_split_uint(config, split: str, max_examples: int | None = None) -> np.ndarray:
  """All images of a split as integer levels [n, H, W, C] (uint8), resized."""
  source = get_data_source(config, split)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  return np.stack([decode_image(config, source[i]) for i in range(n)])


def load_split_labels(config, split: str, max_examples: int | None = None) -> np.ndarray:
  """The class labels [n] int32 of a labelled split, in the order of `load_split`."""
  source = get_data_source(config, split)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  return np.asarray([int(source[i]['label']) for i in range(n)], np.int32)


def load_split(config, split: str, max_examples: int | None = None) -> np.ndarray:
  """All examples of a split in model space, float32 (no flip, no dequantisation)."""
  source = get_data_source(config, split)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  transform = _example_transform(config, flip=False, dequantize=False)
  return np.stack([transform(source[i], None) for i in range(n)])
