"""Files: atomic writes, plain npz reads, images and PNG grids, stored configs, metric logs.

Everything a job or the training loop writes goes through a temporary file, an
fsync and a rename, so a file under its final name is always complete (also
after a power loss). Nothing here unpickles: npz files are read with
allow_pickle=False.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np


# ----------------------------------------------------------------------------
# Atomic writes and plain reads
# ----------------------------------------------------------------------------

def _sync_directory(directory: str) -> None:
  """Makes a rename in `directory` durable (a file system that cannot sync folders skips it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_atomic(path: str, write, mode: str) -> str:
  """Calls write(file) on a temporary file beside `path`, syncs it to disk and renames it
  to `path`, so a file at `path` is always complete, also after a power loss; a write
  that fails leaves the old file and no temporary."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
  try:
    with open(temporary, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  _sync_directory(directory)
  return path


def savez_atomic(path: str, **arrays) -> str:
  """Writes an .npz at exactly `path` (no '.npz' appended) via a temporary file and a
  rename, so a file at `path` is always complete; returns the path."""
  return _write_atomic(path, lambda f: np.savez(f, **arrays), 'wb')


def load_npz_plain(path: str, what: str, error: type = ValueError,
                   missing_hint: str = '') -> dict:
  """All arrays of an .npz read with allow_pickle=False.

  Raises FileNotFoundError (with `missing_hint`) for a missing file and `error`
  naming the key for an object (pickled) array or an unreadable file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file {path} does not exist.' +
                            (f' {missing_hint}' if missing_hint else ''))
  arrays, key = {}, None
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in npz.files:
        arrays[key] = npz[key]
  except ValueError as cause:
    if key is None:
      raise error(f'{path} is not an .npz file ({cause}).') from None
    if 'allow_pickle' in str(cause) or 'Object arrays' in str(cause):
      raise error(f'{path}: array {key!r} is a pickled object array, which is never '
                  f'loaded (allow_pickle=False); store plain numeric or string '
                  f'arrays.') from None
    raise error(f'{path} is not a readable .npz {what} file ({cause}).') from None
  except (OSError, EOFError) as cause:
    raise error(f'{path} is not a readable .npz {what} file ({cause}).') from None
  return arrays


def load_npz(path: str) -> dict:
  """Plain arrays of an npz file; never unpickles objects."""
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def atomic_json(path: str, value) -> None:
  """Writes `value` as JSON at `path` via a temporary file (unique to this process) and a
  rename, so a file at `path` is always complete."""
  _write_atomic(path, lambda f: json.dump(value, f, indent=2, sort_keys=True), 'w')


# ----------------------------------------------------------------------------
# Images and PNG grids
# ----------------------------------------------------------------------------

def image_grid(images: np.ndarray, ncols: int | None = None, padding: int = 1,
               padding_color: tuple[float, ...] | float = 1.0) -> np.ndarray:
  """[N, H, W, C] values in [0, 1] -> one uint8 [rows (H+p), cols (W+p), C] grid.

  padding_color: the lines between images, one value or one per channel.
  """
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.empty((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                  np.float32)
  grid[...] = np.broadcast_to(np.asarray(padding_color, np.float32), (c,))
  for i in range(n):
    r, col = divmod(i, ncols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = images[i]
  return np.round(grid * 255).astype(np.uint8)


def save_image_grid(path: str, images: np.ndarray, ncols: int | None = None,
                    scale: int = 1, padding_color: tuple[float, ...] | float = 1.0) -> str:
  """Writes a PNG grid of [N, H, W, C] images in [0, 1]; `scale` enlarges pixels."""
  from PIL import Image
  grid = image_grid(images, ncols, padding_color=padding_color)
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  return _write_atomic(path, lambda f: image.save(f, format='PNG'), 'wb')


IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def image_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise ValueError(f'{path} holds no image files ({", ".join(IMAGE_SUFFIXES)}).')
    return files
  return [path]


def read_image_file(path: str, num_channels: int) -> np.ndarray:
  """[H, W, C] float32 in [0, 1] of an image file (grey or RGB to match num_channels)."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      image = image.convert('L' if num_channels == 1 else 'RGB')
      array = np.asarray(image, np.float32) / 255.0
  except (OSError, ValueError) as error:       # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f'{path} is not an image file that can be read ({error}); pass PNG / '
                     f'JPEG files, a folder of them, or an .npz with an "images" array.'
                     ) from None
  return array[..., None] if array.ndim == 2 else array


def load_images(path: str, image_size: int, num_channels: int, *,
                max_images: int | None = None) -> np.ndarray:
  """Images in [0, 1] as float32 [N, H, W, C] from a file or a folder.

  .npz: key 'images' (uint8 levels, divided by levels - 1 with the file's
  'levels' entry, else 255; or floats in [0, 1]) -- the format of sampling
  jobs; .npy: one such array; image files (PNG, JPEG, ...) or a folder of
  them: read as grey or RGB to match `num_channels`. Sizes must match the
  model's; nothing is resized.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'no such file or folder: {path}')
  lower = path.lower()
  if lower.endswith('.npz') or lower.endswith('.npy'):
    if lower.endswith('.npz'):
      with np.load(path, allow_pickle=False) as f:
        if 'images' not in f.files:
          raise ValueError(f'{path} has no "images" array (it has {f.files}).')
        array, levels = f['images'], (int(f['levels']) if 'levels' in f.files else 256)
    else:
      array, levels = np.load(path, allow_pickle=False), 256
    if array.ndim == 3:
      array = array[None] if array.shape[-1] in (1, 3) else array[..., None]
    if np.issubdtype(array.dtype, np.integer):
      images = array.astype(np.float32) / (levels - 1)
    else:
      images = array.astype(np.float32)
  else:
    images = np.stack([read_image_file(f, num_channels) for f in image_files(path)])
  if images.ndim != 4:
    raise ValueError(f'{path}: images must be [N, H, W, C]; got shape {list(images.shape)}.')
  if images.shape[-1] != num_channels:
    raise ValueError(f'{path}: images have {images.shape[-1]} channel(s) but the model takes '
                     f'{num_channels} (config.data.num_channels).')
  if images.shape[1:3] != (image_size, image_size):
    raise ValueError(f'{path}: images are {images.shape[1]}x{images.shape[2]} but the model '
                     f'takes {image_size}x{image_size} (config.data.image_size); resize them.')
  if images.size and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
    raise ValueError(f'{path}: float images must lie in [0, 1]; got values in '
                     f'[{images.min():.3g}, {images.max():.3g}].')
  return images[:max_images] if max_images else images


# the lines between a panel's tiles: a blue that no grey image (masks, masked inputs,
# grey digits) contains, so a white or black tile edge stays visible
PANEL_LINE_COLOR = (0.25, 0.45, 0.85)


def panel_grid(path: str, columns: list[np.ndarray], scale: int | None = None) -> str:
  """RGB PNG of examples in rows and `columns` ([N, H, W, C] each, [0, 1]) side by side.

  Grey columns are repeated to 3 channels; blue lines (PANEL_LINE_COLOR) part the tiles.
  """
  n = columns[0].shape[0]
  columns = [np.repeat(c, 3, axis=-1) if c.shape[-1] == 1 else c for c in columns]
  tiles = np.stack(columns, axis=1).reshape((n * len(columns),) + columns[0].shape[1:])
  scale = scale or max(1, 64 // columns[0].shape[1])
  return save_image_grid(path, tiles, ncols=len(columns), scale=scale,
                         padding_color=PANEL_LINE_COLOR)


# ----------------------------------------------------------------------------
# A workdir's stored config
# ----------------------------------------------------------------------------

def _tuples(tree):
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def read_json_object(path: str, what: str, fix: str) -> dict:
  """The JSON object in `path`; a file that is not one stops with a ValueError naming the
  file, `what` it should hold and the `fix` (files are written atomically, so a damaged
  one was changed by something else)."""
  try:
    with open(path, 'rb') as f:
      value = json.loads(f.read())
  except (ValueError, UnicodeDecodeError) as error:
    raise ValueError(f'{path} is not valid JSON ({error}); it holds {what}: {fix}.') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a {type(value).__name__}, not {what}; {fix}.')
  return value


def read_config_json(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run stored in <workdir>/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no config.json: it is not a score_sde '
                            f'workdir (train into it with launch.py train first).')
  stored = read_json_object(path, f'the stored config of the run in {workdir}',
                            'restore it from a backup, or start a new --workdir')
  return ml_collections.ConfigDict(_tuples(stored))


# ----------------------------------------------------------------------------
# Training logs
# ----------------------------------------------------------------------------

class MetricWriter:
  """Scalars to <workdir>/logs/metrics.jsonl and TensorBoard event files (process 0).

  Each row is one JSON line, written by one append. A line cut short by an
  earlier run's interruption (a power loss mid-write) is closed with a newline
  before the first new row, so it never swallows one; `read_metrics` skips it.

  `start_step`: the step a training run starts from (its checkpoint's step, 0
  for a new run). Rows an interrupted run logged after it are computed again;
  TensorBoard is told to hide the earlier ones (a restart event at start_step +
  1), so its curves do not run back in step. `read_metrics` keeps the later row.
  """

  def __init__(self, workdir: str, start_step: int | None = None):
    self._active = jax.process_index() == 0
    self._dir = os.path.join(workdir, 'logs')
    self._path = os.path.join(self._dir, 'metrics.jsonl')
    self._tb = None
    if self._active:
      os.makedirs(self._dir, exist_ok=True)
      if _ends_without_newline(self._path):
        _append(self._path, '\n')
      from tensorboardX import SummaryWriter
      # tensorboardX names its file by the second and opens it with 'wb': a suffix in
      # nanoseconds keeps a writer started within the same second from truncating an
      # earlier one's file, and keeps the files in order of creation.
      self._tb = SummaryWriter(
          self._dir, purge_step=None if start_step is None else int(start_step) + 1,
          filename_suffix=f'.{time.time_ns()}')

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    _append(self._path, json.dumps({'step': int(step),
                                    **{k: float(v) for k, v in scalars.items()}}) + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    """Writes out the TensorBoard events its thread has taken so far (the JSON rows are
    written as they come); tensorboardX itself writes every 120 s and on close."""
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _ends_without_newline(path: str) -> bool:
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return False
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def _append(path: str, text: str) -> None:
  """Appends `text` with one write call (O_APPEND: never interleaved with another append)."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    data = text.encode()
    while data:
      data = data[os.write(fd, data):]
  finally:
    os.close(fd)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/logs/metrics.jsonl by step: [{'step': int, name: float, ...}].

  A resumed run recomputes the steps after its checkpoint, so a step logged
  before an interruption is logged again; the later row replaces the earlier
  one with the same step and names (their values agree: resume is exact). A
  line that is not a JSON row (one cut short by an interruption) is skipped.
  """
  path = os.path.join(workdir, 'logs', 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; train with --workdir {workdir} first.')
  latest = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue                        # a line cut short by an interrupted write
      if isinstance(row, dict) and 'step' in row:
        latest[(row['step'], tuple(sorted(row)))] = row   # keeps the first row's place
  return sorted(latest.values(), key=lambda row: row['step'])


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'
