"""Reads ``torch.save`` checkpoints as numpy, without torch and without running code from the file.

Since torch 1.6, ``torch.save`` writes a zip archive with one top folder ``<name>/``:

  <name>/data.pkl        a pickle (protocol 2) of the saved object; every tensor in it is
                         ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
                         whose ``storage`` is a persistent id
                         ``('storage', torch.<Type>Storage, key, location, numel)``
  <name>/data/<key>      the raw bytes of storage ``key``
  <name>/byteorder       'little' or 'big' (absent in old files: little)
  <name>/version         the format version

A pickle can call any importable callable, so ``data.pkl`` is read by an unpickler whose
``find_class`` resolves an explicit allow-list of names (the tensor and parameter rebuilders,
the storage types, ``collections.OrderedDict``, ``torch.Size`` and the few builtins protocol 2
needs) to functions of this module that only build numpy arrays and plain containers; any
other global raises `UnsafeCheckpointError` before anything is called. A tensor element
(i, j, ...) is ``storage[offset + i * stride[0] + j * stride[1] + ...]``; bounds are checked
against the storage before any view is taken, so a crafted file cannot read outside it.
"""
from __future__ import annotations

import _compat_pickle
import collections
import importlib
import pickle
import sys
import tarfile
import types
import zipfile

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(ValueError):
  """The checkpoint's pickle names a global outside the allow-list of plain weights files."""


# ----------------------------------------------------------------------------
# What a plain weights file may name
# ----------------------------------------------------------------------------

# torch's legacy storage classes (what `_rebuild_tensor_v2` storages are pickled as) and the
# element type of their bytes. UntypedStorage carries bytes; `_rebuild_tensor_v3` names the dtype.
_STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
}

# torch dtypes as `_rebuild_tensor_v3` receives them (pickled as the global `torch.<name>`).
_TORCH_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint64': np.uint64, 'uint32': np.uint32, 'uint16': np.uint16, 'uint8': np.uint8,
    'bool': np.bool_, 'complex64': np.complex64, 'complex128': np.complex128,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz, 'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}


class _Inert:
  """Base of the placeholders the unpickler hands out: pickle BUILD cannot alter them."""
  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafeCheckpointError(
        f'refused to set the state of a {type(self).__name__}: the file is not a plain '
        'weights file and will not be loaded')


class _StorageType(_Inert):
  """Stands for `torch.<name>Storage`: the element type of a storage's bytes."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str, dtype: np.dtype):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'dtype', dtype)


class _DType(_Inert):
  """Stands for a torch dtype global such as `torch.float32`."""
  __slots__ = ('dtype',)

  def __init__(self, dtype):
    object.__setattr__(self, 'dtype', np.dtype(dtype))


class _Storage(_Inert):
  """A storage's bytes as written, the element type it was saved with, and whether its
  byte order is the opposite of this machine's."""
  __slots__ = ('data', 'dtype', 'swap')

  def __init__(self, data: np.ndarray, dtype: np.dtype, swap: bool):
    object.__setattr__(self, 'data', data)
    object.__setattr__(self, 'dtype', dtype)
    object.__setattr__(self, 'swap', swap)


class _TensorType(_Inert):
  """Stands for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""
  __slots__ = ()


class _Call(_Inert):
  """An allowed callable of this module, wrapped so that pickle BUILD cannot change it
  (a plain function's __defaults__ could be set from the file)."""
  __slots__ = ('function',)

  def __init__(self, function):
    object.__setattr__(self, 'function', function)

  def __call__(self, *args):
    return self.function(*args)


def _is_int_tuple(value) -> bool:
  return isinstance(value, tuple) and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _strided_copy(storage, offset, size, stride, dtype) -> np.ndarray:
  """The C-contiguous array whose element (i, j, ...) is
  storage[offset + i * stride[0] + j * stride[1] + ...], in elements of `dtype`."""
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError(
        f'a tensor is built on {type(storage).__name__}, not on a storage of the archive: the '
        'file is not a plain weights file and will not be loaded')
  if not (isinstance(offset, int) and offset >= 0 and _is_int_tuple(size)
          and _is_int_tuple(stride) and len(size) == len(stride)):
    raise ValueError(f'a tensor has an invalid layout (offset {offset!r}, size {size!r}, '
                     f'stride {stride!r}); the checkpoint is corrupt, re-save it with torch.save')
  dtype = np.dtype(dtype)
  numel = storage.data.size // dtype.itemsize
  if 0 in size:
    return np.zeros(size, dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= numel:
    raise ValueError(f'a tensor (offset {offset}, size {size}, stride {stride}) reaches element '
                     f'{last} of a storage of {numel}; the checkpoint is corrupt or truncated, '
                     're-save it with torch.save')
  elements = storage.data[:numel * dtype.itemsize].view(dtype)[offset:]
  view = np.lib.stride_tricks.as_strided(
      elements, shape=size, strides=tuple(s * dtype.itemsize for s in stride), writeable=False)
  values = np.array(view, order='C', copy=True)
  if storage.swap and dtype.itemsize > 1:
    unit = dtype.itemsize // 2 if dtype.kind == 'c' else dtype.itemsize  # complex: per part
    values.reshape(-1).view(f'u{unit}').byteswap(inplace=True)
  return values


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd flags, hooks: not part of the values
  return _strided_copy(storage, offset, size, stride,
                       storage.dtype if isinstance(storage, _Storage) else np.uint8)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _DType):
    raise UnsafeCheckpointError(
        f'a tensor names dtype {type(dtype).__name__}, not a torch dtype: the file is not a '
        'plain weights file and will not be loaded')
  return _strided_copy(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  """nn.Parameter(data): its values are the tensor's; the Parameter's own state is dropped."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise UnsafeCheckpointError(
        f'a Parameter wraps a {type(data).__name__}, not a tensor: the file is not a plain '
        'weights file and will not be loaded')
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """A Tensor / Parameter carrying Python attributes: its values, attributes dropped."""
  del state
  rebuilders = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
  if not (isinstance(func, _Call) and func.function in rebuilders
          and isinstance(new_type, _TensorType) and isinstance(args, tuple)):
    raise UnsafeCheckpointError(
        'a tensor subclass is rebuilt with something other than a tensor rebuilder: the file '
        'is not a plain weights file and will not be loaded')
  return func(*args)


def _size(dims=()):
  """torch.Size(dims) as a plain tuple of ints."""
  dims = tuple(dims)
  if not all(isinstance(d, int) for d in dims):
    raise ValueError(f'a torch.Size holds {dims!r}, not ints; the checkpoint is corrupt')
  return dims


def _encode(text, encoding='latin1'):
  """Protocol 2 writes bytes as `_codecs.encode(str, 'latin1')`: only that is allowed."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafeCheckpointError(
        f'_codecs.encode asked for encoding {encoding!r}: the file is not a plain weights file '
        'and will not be loaded')
  return text.encode('latin1')


def _allowed_globals() -> types.MappingProxyType:
  allowed = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _Call(_rebuild_tensor_v2),
      ('torch._utils', '_rebuild_tensor_v3'): _Call(_rebuild_tensor_v3),
      ('torch._utils', '_rebuild_parameter'): _Call(_rebuild_parameter),
      ('torch._utils', '_rebuild_parameter_with_state'): _Call(_rebuild_parameter),
      ('torch._tensor', '_rebuild_from_type_v2'): _Call(_rebuild_from_type_v2),
      ('torch', 'Tensor'): _TensorType(),
      ('torch.nn.parameter', 'Parameter'): _TensorType(),
      ('torch', 'Size'): _Call(_size),
      ('_codecs', 'encode'): _Call(_encode),
      ('builtins', 'set'): set,
      ('builtins', 'frozenset'): frozenset,
      ('builtins', 'complex'): complex,
      ('builtins', 'bytearray'): bytearray,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[('torch', name)] = _StorageType(name, dtype)
  allowed[('torch.storage', 'UntypedStorage')] = _StorageType('UntypedStorage', np.dtype(np.uint8))
  for name, dtype in _TORCH_DTYPES.items():
    allowed[('torch', name)] = _DType(dtype)
  return types.MappingProxyType(allowed)


# (module, name) -> what the unpickler hands out for it; everything else is refused.
ALLOWED_GLOBALS = _allowed_globals()


# ----------------------------------------------------------------------------
# The archive
# ----------------------------------------------------------------------------

# torch.save's legacy (pre-zip) files start with this number, pickled as a LONG1.
_LEGACY_MAGIC = bytes.fromhex('8a0a6cfc9c46f9206aa85019')


class _Unpickler(pickle.Unpickler):
  """Unpickles data.pkl: allow-listed globals only, storages read from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file, encoding='utf-8')
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._path = path
    self._storages = {}

  def find_class(self, module, name):
    # Protocol 2 (torch.save's) writes some globals under their Python 2 names.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f'{self._path}: refused global {module}.{name} in its pickle; the file is not a plain '
          'weights file and will not be loaded (this reader never runs code from a checkpoint)'
      ) from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise UnsafeCheckpointError(
          f'{self._path}: refused persistent id {pid!r:.80}; the file is not a plain weights '
          'file and will not be loaded')
    storage_type, key = pid[1], pid[2]
    if key not in self._storages:
      entry = f'{self._prefix}/data/{key}'
      try:
        raw = self._archive.read(entry)
      except KeyError:
        raise ValueError(f'{self._path}: storage {entry} is missing from the archive; the '
                         'checkpoint is truncated, copy or re-save it') from None
      self._storages[key] = np.frombuffer(raw, np.uint8)
    return _Storage(self._storages[key], storage_type.dtype, self._byteorder != sys.byteorder)


def _not_a_zip_error(path: str) -> ValueError:
  with open(path, 'rb') as f:
    head = f.read(32)
  if (head[:1] == b'\x80' and _LEGACY_MAGIC in head) or tarfile.is_tarfile(path):
    return ValueError(
        f'{path} is a legacy (torch<1.6) torch.save file, which this reader does not parse; '
        're-save it with torch>=1.6 on a machine with torch: '
        'torch.save(torch.load(f, weights_only=True), g)')
  if head[:1] == b'\x80':
    return ValueError(f'{path} is a plain Python pickle, not a torch.save checkpoint (a zip '
                      'archive); load only files written by torch.save with torch>=1.6')
  return ValueError(f'{path} is not a PyTorch checkpoint: neither a torch.save zip archive '
                    'nor a legacy torch.save file; check the path')


def _record_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The archive's top folder, `<name>` of `<name>/data.pkl`."""
  names = archive.namelist()
  prefixes = [n[:-len('/data.pkl')] for n in names
              if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(prefixes) == 1:
    return prefixes[0]
  if any(n.endswith('/constants.pkl') for n in names):
    raise ValueError(f'{path} is a TorchScript archive (torch.jit.save), not a torch.save '
                     'checkpoint; save the model\'s state_dict() with torch.save instead')
  raise ValueError(f'{path} is a zip archive but not a torch.save checkpoint (it has '
                   f'{len(prefixes)} <name>/data.pkl entries, torch.save writes one)')


def _load_pure(path: str):
  if not zipfile.is_zipfile(path):
    raise _not_a_zip_error(path)
  with zipfile.ZipFile(path) as archive:
    prefix = _record_prefix(archive, path)
    try:
      byteorder = archive.read(f'{prefix}/byteorder').decode('ascii', 'replace').strip()
    except KeyError:
      byteorder = 'little'  # files from torch versions that did not record it
    if byteorder not in ('little', 'big'):
      raise ValueError(f'{path}: unknown byte order {byteorder!r} in {prefix}/byteorder (torch '
                       'writes little or big); re-save the checkpoint with torch.save')
    with archive.open(f'{prefix}/data.pkl') as pickled:
      try:
        return _Unpickler(pickled, archive, prefix, byteorder, path).load()
      except (pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f'{path}: {prefix}/data.pkl is not a readable pickle ({error}); the '
                         'checkpoint is corrupt, copy or re-save it') from None
      except ValueError as error:
        if type(error) not in (ValueError, UnsafeCheckpointError) or path in str(error):
          raise
        raise type(error)(f'{path}: {error}') from None  # the rebuilders do not know the file


# ----------------------------------------------------------------------------
# Through torch itself, when installed
# ----------------------------------------------------------------------------

def _to_numpy(value, torch):
  """Tensors (Parameters included) as numpy, torch.Size as tuple, containers rebuilt."""
  if isinstance(value, torch.Tensor):
    tensor = value.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()
  if isinstance(value, torch.Size):
    return tuple(value)
  if isinstance(value, dict):
    return type(value)((k, _to_numpy(v, torch)) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return type(value)(_to_numpy(v, torch) for v in value)
  return value


def _load_with_torch(path: str):
  try:
    torch = importlib.import_module('torch')
  except ImportError:
    raise ImportError('load(path, use_torch=True) needs torch, which is not installed here; '
                      'install torch or call load(path) (the reader without torch)') from None
  return _to_numpy(torch.load(path, map_location='cpu', weights_only=True), torch)


# ----------------------------------------------------------------------------
# Public
# ----------------------------------------------------------------------------

def load(path, use_torch: bool = False):
  """The contents of a ``torch.save`` file (torch >= 1.6), tensors as numpy arrays.

  Tensors and parameters become C-contiguous numpy arrays of the same dtype and shape
  (bfloat16 as ``ml_dtypes.bfloat16``), ``torch.Size`` a tuple; dicts, OrderedDicts, lists,
  tuples and Python scalars stay as they are. Nothing in the file is executed: a pickle naming
  any global outside the allow-list raises `UnsafeCheckpointError`.

  Args:
    path: the file.
    use_torch: read it with ``torch.load(path, map_location='cpu', weights_only=True)``
      instead (needs torch), then convert tensors the same way.

  Raises:
    UnsafeCheckpointError: the pickle names a global that plain weights files do not.
    ValueError: a legacy (torch<1.6) file, a plain pickle, or not a torch file at all.
  """
  path = str(path)
  if use_torch:
    return _load_with_torch(path)
  return _load_pure(path)
