"""The torch.save reader: the original code base's checkpoints load as numpy; tensors decode
exactly (strided and offset views, dtypes, either byte order); a pickle naming anything
outside the allow-list is refused before it runs; files that are not torch.save zip
archives get a one-line error that says what they are."""
import collections
import contextlib
import glob
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from score_sde.convert import torch_pickle
from score_sde.convert.torch_pickle import UnsafeCheckpointError

ORIGINAL = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                        'original_checkpoints', 'torch')
FIXTURES = sorted(glob.glob(os.path.join(ORIGINAL, '*', 'checkpoint_5.pth')))
# torch is never a dependency: this one cross-check against real torch.save files runs
# where SCORE_SDE_TORCH_PYTHON names a Python that has torch and numpy.
TORCH_PYTHON = os.environ.get('SCORE_SDE_TORCH_PYTHON', '/tmp/torchvenv/bin/python')


# ----------------------------------------------------------------------------
# Checkpoints written by yang-song/score_sde_pytorch itself
# ----------------------------------------------------------------------------

def test_the_original_checkpoints_are_there():
  if not FIXTURES:
    pytest.fail(f'the original torch checkpoints are missing under {ORIGINAL}')
  assert len(FIXTURES) == 5


@pytest.fixture(scope='module', params=FIXTURES, ids=lambda p: os.path.basename(os.path.dirname(p)))
def original(request):
  with open(os.path.join(os.path.dirname(request.param), 'fixture.json')) as f:
    fixture = json.load(f)
  return torch_pickle.load(request.param), fixture


def test_an_original_checkpoint_has_the_saved_state(original):
  checkpoint, fixture = original
  assert set(checkpoint) == {'optimizer', 'model', 'ema', 'step'}
  assert checkpoint['step'] == fixture['step'] == 250000
  model = checkpoint['model']
  assert isinstance(model, collections.OrderedDict)
  assert model and all(key.startswith('module.') for key in model)
  for value in model.values():
    assert isinstance(value, np.ndarray) and value.flags.c_contiguous


def _split_state_dict(model):
  """(parameter keys in parameters() order, trainable keys) by score_sde_pytorch's rules:
  the models' only buffer is 'sigmas'; the only Parameter with requires_grad=False is
  GaussianFourierProjection.W, the first module when the embedding is Fourier."""
  parameters = [key for key in model if key != 'module.sigmas']
  trainable = [key for key in parameters if key != 'module.all_modules.0.W']
  return parameters, trainable


def test_ema_shadows_the_trainable_parameters_in_order(original):
  checkpoint, _ = original
  model, ema, adam = checkpoint['model'], checkpoint['ema'], checkpoint['optimizer']
  parameters, trainable = _split_state_dict(model)
  shadows = ema['shadow_params']
  assert isinstance(shadows, list) and len(shadows) == len(trainable)
  assert [s.shape for s in shadows] == [model[key].shape for key in trainable]
  assert all(s.dtype == np.float32 for s in shadows)
  assert all(model[key].dtype == np.float32 for key in parameters)
  assert 0.0 < ema['decay'] < 1.0
  # Adam indexes every parameter, and keeps moments exactly for those that got gradients.
  assert adam['param_groups'][0]['params'] == list(range(len(parameters)))
  assert sorted(adam['state']) == [parameters.index(key) for key in trainable]
  for index, moments in adam['state'].items():
    assert moments['exp_avg'].shape == model[parameters[index]].shape
    assert moments['exp_avg_sq'].dtype == np.float32 and (moments['exp_avg_sq'] >= 0).all()
  # The averages are their own arrays, not the training parameters.
  assert any(not np.array_equal(s, model[key]) for s, key in zip(shadows, trainable))


def test_the_fourier_projection_is_a_parameter_without_gradient():
  path = os.path.join(ORIGINAL, 've_cifar10_ncsnpp_continuous', 'checkpoint_5.pth')
  checkpoint = torch_pickle.load(path)
  parameters, trainable = _split_state_dict(checkpoint['model'])
  assert parameters[0] == 'module.all_modules.0.W' and len(trainable) == len(parameters) - 1
  assert 0 not in checkpoint['optimizer']['state']


def test_sigmas_decode_as_the_float64_geometric_sequence(original):
  sigmas = original[0]['model']['module.sigmas']
  assert sigmas.dtype == np.float64 and sigmas.ndim == 1 and sigmas.size > 1
  ratios = sigmas[1:] / sigmas[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
  assert ratios[0] < 1.0


# ----------------------------------------------------------------------------
# Hand-built archives with the structure torch.save writes
# ----------------------------------------------------------------------------

def _named(module, name, obj):
  obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
  return obj


def _rebuild_stub(*args):
  raise AssertionError('a stand-in for a torch global must never be called')


class _Storage:
  """A storage to be written as <name>/data/<key>: its values and torch's class name."""

  def __init__(self, values, type_name, key):
    self.values, self.type_name, self.key = np.asarray(values), type_name, key


def _storage_global(type_name):
  """Where torch's pickles name a storage class: typed ones as torch.<T>Storage."""
  return ('torch.storage.UntypedStorage' if type_name == 'UntypedStorage'
          else f'torch.{type_name}')


class _Tensor:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

  def __init__(self, storage, offset, size, stride, dtype=None, parameter=False):
    self.args = (storage, offset, tuple(size), tuple(stride))
    self.dtype, self.parameter = dtype, parameter


class _Global:
  """Pickles as the global module.name (through a stand-in module while pickling)."""

  def __init__(self, module, name, args):
    self.module, self.name, self.args = module, name, args


@contextlib.contextmanager
def _stand_in_modules(names):
  """Modules holding stand-ins for `names` (module.attr) while the test pickler runs, so that
  pickle writes GLOBAL module.attr; removed afterwards."""
  added = []
  for full in names:
    module_name, attr = full.rsplit('.', 1)
    parts = module_name.split('.')
    for depth in range(1, len(parts) + 1):        # parent packages first
      package = '.'.join(parts[:depth])
      if package not in sys.modules:
        sys.modules[package] = types.ModuleType(package)
        added.append(package)
    module = sys.modules[module_name]
    if not hasattr(module, attr):
      setattr(module, attr, _named(module_name, attr, lambda *a: _rebuild_stub(*a)))
  try:
    yield {full: getattr(sys.modules[full.rsplit('.', 1)[0]], full.rsplit('.', 1)[1])
           for full in names}
  finally:
    for name in added:
      del sys.modules[name]


class _TorchLikePickler(pickle.Pickler):
  """Protocol 2, storages as persistent ids ('storage', torch.<T>Storage, key, 'cpu', numel),
  tensors as REDUCE of torch._utils._rebuild_tensor_v2 / v3, Parameters around them."""

  def __init__(self, file, stand_ins):
    super().__init__(file, protocol=2)
    self.stand_ins = stand_ins

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      numel = obj.values.size if obj.type_name != 'UntypedStorage' else obj.values.nbytes
      return ('storage', self.stand_ins[_storage_global(obj.type_name)], obj.key, 'cpu', numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _Tensor):
      if obj.dtype is None:
        tensor = (self.stand_ins['torch._utils._rebuild_tensor_v2'],
                  obj.args + (False, collections.OrderedDict()))
      else:
        tensor = (self.stand_ins['torch._utils._rebuild_tensor_v3'],
                  obj.args + (False, collections.OrderedDict(),
                              self.stand_ins[f'torch.{obj.dtype}']))
      if obj.parameter:
        return (self.stand_ins['torch._utils._rebuild_parameter'],
                (_Tensor(*obj.args), True, collections.OrderedDict()))
      return tensor
    if isinstance(obj, _Global):
      return (self.stand_ins[f'{obj.module}.{obj.name}'], obj.args)
    return NotImplemented


def _collect(obj, storages, names):
  """The storages (by key) and the globals (module.name) that pickling `obj` needs."""
  if isinstance(obj, _Storage):
    storages[obj.key] = obj
    names.add(_storage_global(obj.type_name))
  elif isinstance(obj, _Tensor):
    names.update(['torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_parameter'])
    if obj.dtype is not None:
      names.update(['torch._utils._rebuild_tensor_v3', f'torch.{obj.dtype}'])
    _collect(obj.args[0], storages, names)
  elif isinstance(obj, _Global):
    names.add(f'{obj.module}.{obj.name}')
    _collect(obj.args, storages, names)
  elif isinstance(obj, dict):
    for value in obj.values():
      _collect(value, storages, names)
  elif isinstance(obj, (list, tuple)):
    for value in obj:
      _collect(value, storages, names)
  return storages, names


def _write_pth(path, obj, byteorder='little', name='archive'):
  """A torch.save-style zip: <name>/data.pkl, <name>/data/<key>, byteorder, version; each
  storage's elements in `byteorder`."""
  storages, names = _collect(obj, {}, set())
  buffer = io.BytesIO()
  with _stand_in_modules(sorted(names)) as stand_ins:
    _TorchLikePickler(buffer, stand_ins).dump(obj)
  order = '<' if byteorder == 'little' else '>'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(f'{name}/data.pkl', buffer.getvalue())
    archive.writestr(f'{name}/byteorder', byteorder)
    for key, storage in storages.items():
      values = storage.values
      if values.dtype.kind in 'fiuc' and values.dtype.itemsize > 1:
        values = values.astype(values.dtype.newbyteorder(order))
      elif values.dtype == ml_dtypes.bfloat16:
        values = values.view(np.uint16).astype(f'{order}u2')
      archive.writestr(f'{name}/data/{key}', values.tobytes())
    archive.writestr(f'{name}/version', '3\n')
  return path


def _views():
  """(object to save, what each entry must load as)."""
  shared = np.arange(24, dtype=np.float32) * 0.5 - 3.0
  storage = _Storage(shared, 'FloatStorage', '0')
  wide = _Storage(np.linspace(-2, 2, 7), 'DoubleStorage', '1')
  brain = _Storage(np.array([1.5, -0.25, 3e38, -7.0], ml_dtypes.bfloat16), 'BFloat16Storage', '2')
  half = _Storage(np.array([[1, -2], [0.5, 65504]], np.float16), 'HalfStorage', '3')
  longs = _Storage(np.array([2**40, -3, 7], np.int64), 'LongStorage', '4')
  flags = _Storage(np.array([True, False, True]), 'BoolStorage', '5')
  pairs = _Storage(np.array([1 + 2j, -3.5j, 4], np.complex64), 'ComplexFloatStorage', '6')
  raw = np.array([1, 65535, 300], np.uint16)
  untyped = _Storage(raw, 'UntypedStorage', '7')   # bytes; the tensor names its dtype
  saved = {
      'transposed': _Tensor(storage, 0, (4, 6), (1, 4)),       # a (6, 4) matrix's transpose
      'offset_slice': _Tensor(storage, 5, (3,), (2,)),         # shared[5:11:2]
      'block': _Tensor(storage, 9, (2, 3), (8, 1)),            # rows of a (., 8) view
      'scalar': _Tensor(storage, 7, (), ()),
      'empty': _Tensor(storage, 0, (0, 3), (3, 1)),
      'parameter': _Tensor(storage, 12, (3, 4), (4, 1), parameter=True),
      'float64': _Tensor(wide, 2, (5,), (1,)),
      'bfloat16': _Tensor(brain, 1, (3,), (1,)),
      'float16': _Tensor(half, 0, (2, 2), (1, 2)),
      'int64': _Tensor(longs, 0, (3,), (1,)),
      'bool': _Tensor(flags, 0, (3,), (1,)),
      'complex64': _Tensor(pairs, 0, (3,), (1,)),
      'uint16_v3': _Tensor(untyped, 1, (2,), (1,), dtype='uint16'),
      'size': _Global('torch', 'Size', ((2, 3),)),
      'nested': collections.OrderedDict(
          [('list', [_Tensor(storage, 0, (2,), (12,)), 3, None]), ('tuple', (0.5, 'x', True))]),
  }
  expected = {
      'transposed': shared[:24].reshape(6, 4).T,
      'offset_slice': shared[5:11:2],
      'block': np.stack([shared[9:12], shared[17:20]]),
      'scalar': np.array(shared[7]),
      'empty': np.zeros((0, 3), np.float32),
      'parameter': shared[12:24].reshape(3, 4),
      'float64': np.linspace(-2, 2, 7)[2:],
      'bfloat16': brain.values[1:],
      'float16': half.values.reshape(-1).reshape(2, 2, order='F'),
      'int64': longs.values,
      'bool': flags.values,
      'complex64': pairs.values,
      'uint16_v3': raw[1:],
      'size': (2, 3),
      'nested': collections.OrderedDict(
          [('list', [shared[[0, 12]], 3, None]), ('tuple', (0.5, 'x', True))]),
  }
  return saved, expected


def _assert_same(loaded, expected):
  assert type(loaded) is type(expected)
  if isinstance(expected, np.ndarray):
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    assert loaded.flags.c_contiguous and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, expected)
  elif isinstance(expected, dict):
    assert list(loaded) == list(expected)
    for key in expected:
      _assert_same(loaded[key], expected[key])
  elif isinstance(expected, (list, tuple)):
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected):
      _assert_same(a, b)
  else:
    assert loaded == expected


@pytest.mark.parametrize('byteorder', ['little', 'big'])
def test_strided_views_and_dtypes_decode_exactly(tmp_path, byteorder):
  saved, expected = _views()
  path = _write_pth(str(tmp_path / 'views.pth'), saved, byteorder=byteorder)
  loaded = torch_pickle.load(path)
  _assert_same(loaded, expected)


def test_views_of_one_storage_load_as_independent_arrays(tmp_path):
  saved, _ = _views()
  loaded = torch_pickle.load(_write_pth(str(tmp_path / 'views.pth'), saved))
  before = loaded['offset_slice'].copy()
  loaded['transposed'][...] = 0.0
  np.testing.assert_array_equal(loaded['offset_slice'], before)


def test_a_view_past_its_storage_is_refused(tmp_path):
  storage = _Storage(np.zeros(6, np.float32), 'FloatStorage', '0')
  path = _write_pth(str(tmp_path / 'long.pth'), {'w': _Tensor(storage, 2, (2, 3), (3, 1))})
  with pytest.raises(ValueError, match=r'long\.pth: a tensor .* reaches element 7 of a '
                     r'storage of 6; .*corrupt') as err:
    torch_pickle.load(path)
  assert '\n' not in str(err.value)


def test_a_missing_storage_names_the_entry(tmp_path):
  path = str(tmp_path / 'cut.pth')
  storage = _Storage(np.zeros(4, np.float32), 'FloatStorage', '0')
  _write_pth(path, {'w': _Tensor(storage, 0, (4,), (1,))})
  with zipfile.ZipFile(path) as archive:
    entries = {n: archive.read(n) for n in archive.namelist() if n != 'archive/data/0'}
  with zipfile.ZipFile(path, 'w') as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  with pytest.raises(ValueError, match=r'storage archive/data/0 is missing.*truncated'):
    torch_pickle.load(path)


def test_an_unknown_byte_order_is_refused(tmp_path):
  path = _write_pth(str(tmp_path / 'odd.pth'), {'step': 1}, byteorder='middle')
  with pytest.raises(ValueError, match=r"unknown byte order 'middle'"):
    torch_pickle.load(path)


# ----------------------------------------------------------------------------
# Refusal: nothing in the file runs
# ----------------------------------------------------------------------------

def _attack(kind, marker):
  import builtins
  import subprocess as sp
  if kind == 'os.system':
    return os.system, (f'touch {marker}',)
  if kind == 'builtins.eval':
    return builtins.eval, (f'open({marker!r}, "w").close()',)
  return sp.Popen, (['touch', marker],)


class _Payload:
  def __init__(self, call):
    self.call = call

  def __reduce__(self):
    return self.call


@pytest.mark.parametrize('kind,refused', [
    ('os.system', r'(posix|os)\.system'),
    ('builtins.eval', r'builtins\.eval'),
    ('subprocess.Popen', r'subprocess\.Popen'),
])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, kind, refused):
  marker = str(tmp_path / 'ran')
  storage = _Storage(np.ones(2, np.float32), 'FloatStorage', '0')
  saved = {'model': {'w': _Tensor(storage, 0, (2,), (1,))},
           'step': _Payload(_attack(kind, marker))}
  path = _write_pth(str(tmp_path / 'evil.pth'), saved)
  with pytest.raises(UnsafeCheckpointError,
                     match=rf'evil\.pth: refused global {refused} .*not a plain weights file and '
                     r'will not be loaded') as err:
    torch_pickle.load(path)
  assert isinstance(err.value, ValueError) and '\n' not in str(err.value)
  assert not os.path.exists(marker)


def test_even_a_harmless_class_outside_the_allow_list_is_refused(tmp_path):
  path = _write_pth(str(tmp_path / 'counter.pth'),
                    {'counts': _Global('collections', 'Counter', ({'a': 1},))})
  with pytest.raises(UnsafeCheckpointError, match=r'refused global collections\.Counter'):
    torch_pickle.load(path)


def test_pickle_build_cannot_change_an_allowed_callable(tmp_path):
  state = pickle.dumps((None, {'__defaults__': ({'conj': True},)}), protocol=2)[2:-1]
  data = b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n' + state + pickle.BUILD + pickle.STOP
  path = str(tmp_path / 'build.pth')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', data)
  with pytest.raises(UnsafeCheckpointError,
                     match=r'build\.pth: refused to set the state of a _Call'):
    torch_pickle.load(path)
  assert torch_pickle._rebuild_tensor_v2.__defaults__ == (None,)


def test_a_persistent_id_that_is_not_a_storage_is_refused(tmp_path):
  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return ('module', 'os', 'import os') if obj == 'hook' else None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump({'w': 'hook'})
  path = str(tmp_path / 'pid.pth')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue())
  with pytest.raises(UnsafeCheckpointError, match=r"refused persistent id \('module'"):
    torch_pickle.load(path)


def test_a_tensor_on_something_other_than_a_storage_is_refused(tmp_path):
  path = _write_pth(str(tmp_path / 'fake.pth'),
                    {'w': _Global('torch._utils', '_rebuild_tensor_v2',
                                  ('not a storage', 0, (1,), (1,), False, {}))})
  with pytest.raises(UnsafeCheckpointError, match=r'fake\.pth: .* built on str, not on a storage'):
    torch_pickle.load(path)


def test_a_view_one_element_past_its_storage_is_refused(tmp_path):
  # The last element a view reads is offset + sum((n - 1) * stride); it must be < numel.
  storage = _Storage(np.arange(6, dtype=np.float32), 'FloatStorage', '0')
  path = _write_pth(str(tmp_path / 'edge.pth'), {'w': _Tensor(storage, 1, (2, 3), (3, 1))})
  with pytest.raises(ValueError, match=r'reaches element 6 of a storage of 6'):
    torch_pickle.load(path)
  fits = _write_pth(str(tmp_path / 'fits.pth'), {'w': _Tensor(storage, 0, (2, 3), (3, 1))})
  np.testing.assert_array_equal(torch_pickle.load(fits)['w'], np.arange(6).reshape(2, 3))


@pytest.mark.parametrize('offset,size,stride', [
    (0, (3,), (-1,)),         # would read before the storage
    (5, (3,), (-1,)),         # in bounds, but torch never writes negative strides
    (-1, (2,), (1,)),
    (0, (2, -1), (1, 1)),
    (0, (2, 2), (1,)),        # one stride for two dimensions
])
def test_a_negative_or_inconsistent_layout_is_refused(tmp_path, offset, size, stride):
  storage = _Storage(np.arange(6, dtype=np.float32), 'FloatStorage', '0')
  path = _write_pth(str(tmp_path / 'neg.pth'), {'w': _Tensor(storage, offset, size, stride)})
  with pytest.raises(ValueError, match=r'neg\.pth: a tensor has an invalid layout'):
    torch_pickle.load(path)


def test_a_file_without_a_byteorder_record_is_little_endian(tmp_path):
  # torch versions before the byteorder record wrote little-endian storages only.
  values = np.array([1.5, -2.0, 3e-5, 7.0], np.float32)
  path = _write_pth(str(tmp_path / 'old.pth'),
                    {'w': _Tensor(_Storage(values, 'FloatStorage', '0'), 0, (4,), (1,))})
  with zipfile.ZipFile(path) as archive:
    entries = {n: archive.read(n) for n in archive.namelist() if n != 'archive/byteorder'}
  with zipfile.ZipFile(path, 'w') as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  np.testing.assert_array_equal(torch_pickle.load(path)['w'], values)


def _op_global(module, name):
  """Pickle opcode GLOBAL module.name (what protocol 2 writes for a class or function)."""
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _op_value(value):
  """The opcodes that push `value` (plain Python data) onto the unpickler's stack."""
  return pickle.dumps(value, protocol=2)[2:-1]


def _op_storage(type_name, key, numel):
  """A persistent id ('storage', torch.<type_name>, key, 'cpu', numel), as torch.save writes it."""
  return (b'(' + _op_value('storage') + _op_global('torch', type_name) + _op_value(key)
          + _op_value('cpu') + _op_value(numel) + b't' + pickle.BINPERSID)


def _write_raw(path, body, storages=None):
  """A torch.save-style zip whose data.pkl is protocol 2 `body` (a value, then STOP)."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02' + body + pickle.STOP)
    archive.writestr('archive/byteorder', 'little')
    for key, values in (storages or {}).items():
      archive.writestr(f'archive/data/{key}', np.asarray(values).astype('<f4').tobytes())
  return str(path)


def _op_tensor_v2(storage_ops, offset, size, stride):
  return (_op_global('torch._utils', '_rebuild_tensor_v2') + b'(' + storage_ops
          + _op_value(offset) + _op_value(size) + _op_value(stride) + _op_value(False)
          + _op_global('collections', 'OrderedDict') + b')R' + b't' + pickle.REDUCE)


def test_tensors_and_parameters_with_python_attributes_load_as_their_values(tmp_path):
  # What torch.save writes for a tensor / Parameter with attributes set on it
  # (_rebuild_from_type_v2, _rebuild_parameter_with_state): values kept, attributes dropped.
  storage = _op_storage('FloatStorage', '0', 4)
  tensor = _op_tensor_v2(storage, 1, (3,), (1,))
  with_attribute = (_op_global('torch._tensor', '_rebuild_from_type_v2') + b'('
                    + _op_global('torch._utils', '_rebuild_tensor_v2')
                    + _op_global('torch', 'Tensor')
                    + b'(' + storage + _op_value(0) + _op_value((2,)) + _op_value((2,))
                    + _op_value(False) + _op_global('collections', 'OrderedDict') + b')R'
                    + b't' + _op_value({'note': 'x'}) + b't' + pickle.REDUCE)
  parameter = (_op_global('torch._utils', '_rebuild_parameter_with_state') + b'(' + tensor
               + _op_value(True) + _op_global('collections', 'OrderedDict') + b')R'
               + _op_value({'note': 'y'}) + b't' + pickle.REDUCE)
  body = (b'(' + _op_value('with_attribute') + with_attribute + _op_value('parameter')
          + parameter + _op_value('raw') + _op_value(b'\x00\xe9\xff') + b'd')
  loaded = torch_pickle.load(_write_raw(tmp_path / 'attrs.pth', body,
                                        {'0': [0.5, 1.5, 2.5, 3.5]}))
  np.testing.assert_array_equal(loaded['with_attribute'], np.float32([0.5, 2.5]))
  np.testing.assert_array_equal(loaded['parameter'], np.float32([1.5, 2.5, 3.5]))
  assert loaded['raw'] == b'\x00\xe9\xff'        # protocol 2 bytes: _codecs.encode(.., 'latin1')


@pytest.mark.parametrize('func,new_type', [
    (('torch', 'Size'), ('torch', 'Tensor')),             # not a tensor rebuilder
    (('_codecs', 'encode'), ('torch', 'Tensor')),
    (('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict')),  # not a tensor type
])
def test_rebuild_from_type_takes_only_a_tensor_rebuilder_and_a_tensor_type(tmp_path, func,
                                                                             new_type):
  args = ((2, 3),) if func[1] == 'Size' else ('text', 'latin1') if func[1] == 'encode' else ()
  body = (_op_global('torch._tensor', '_rebuild_from_type_v2') + b'(' + _op_global(*func)
          + _op_global(*new_type) + _op_value(args) + _op_value({}) + b't' + pickle.REDUCE)
  with pytest.raises(UnsafeCheckpointError,
                     match=r'typed\.pth: a tensor subclass is rebuilt with something other'):
    torch_pickle.load(_write_raw(tmp_path / 'typed.pth', body))


@pytest.mark.parametrize('encoding', ['utf-8', 'rot13', 'base64'])
def test_codecs_encode_is_allowed_only_for_latin1(tmp_path, encoding):
  body = _op_global('_codecs', 'encode') + _op_value(('\xe9t\xe9', encoding)) + pickle.REDUCE
  with pytest.raises(UnsafeCheckpointError, match=rf"encoding '{encoding}'"):
    torch_pickle.load(_write_raw(tmp_path / 'codec.pth', body))


@pytest.mark.parametrize('module,name', [
    ('torch.hub', 'load'),                         # downloads and runs a repository's code
    ('torch.storage', '_load_from_bytes'),         # torch.load without weights_only
    ('torch.serialization', 'load'),
    ('torch._ops', 'ops'),
    ('torch', 'Generator'),
])
def test_torch_globals_outside_the_allow_list_are_refused_without_importing(tmp_path, module,
                                                                            name):
  body = _op_global(module, name) + _op_value(('x',)) + pickle.REDUCE
  before = set(sys.modules)
  with pytest.raises(UnsafeCheckpointError, match=rf'refused global {module}\.{name} '):
    torch_pickle.load(_write_raw(tmp_path / 'torchy.pth', body))
  assert not {m for m in set(sys.modules) - before if m.split('.')[0] == 'torch'}


# ----------------------------------------------------------------------------
# Files that are not torch.save zip archives
# ----------------------------------------------------------------------------

def test_a_truncated_pickle_is_reported_as_corrupt(tmp_path):
  path = str(tmp_path / 'cut.pth')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'step': 1}, protocol=2)[:-3])
  with pytest.raises(ValueError, match=r'cut\.pth: archive/data\.pkl is not a readable pickle'):
    torch_pickle.load(path)


def test_a_plain_pickle_gets_a_one_line_error(tmp_path):
  path = tmp_path / 'state.pkl'
  path.write_bytes(pickle.dumps({'w': [1.0, 2.0]}, protocol=2))
  with pytest.raises(ValueError, match=r'state\.pkl is a plain Python pickle, not a torch\.save '
                     r'checkpoint') as err:
    torch_pickle.load(path)
  assert '\n' not in str(err.value)


def test_random_bytes_get_a_one_line_error(tmp_path):
  path = tmp_path / 'noise.pth'
  path.write_bytes(b'\x00' + np.random.default_rng(0).bytes(4095))
  with pytest.raises(ValueError, match=r'noise\.pth is not a PyTorch checkpoint.*check the path'):
    torch_pickle.load(path)


@pytest.mark.parametrize('protocol', [2, 4])
def test_a_legacy_torch_file_says_how_to_resave_it(tmp_path, protocol):
  path = tmp_path / 'old.pth'
  # What torch<1.6 wrote first: its magic number, pickled with torch.save's protocol.
  path.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=protocol) + pickle.dumps(1001))
  with pytest.raises(ValueError, match=r'old\.pth is a legacy \(torch<1\.6\).*torch\.save\('
                     r'torch\.load\(f, weights_only=True\), g\)') as err:
    torch_pickle.load(path)
  assert '\n' not in str(err.value)


def test_a_zip_without_data_pkl_is_not_a_checkpoint(tmp_path):
  path = str(tmp_path / 'other.zip')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match=r'zip archive but not a torch\.save checkpoint'):
    torch_pickle.load(path)


def test_use_torch_without_torch_says_so(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match=r'use_torch=True\) needs torch.*call load\(path\)'):
    torch_pickle.load(FIXTURES[0] if FIXTURES else 'x.pth', use_torch=True)


def test_importing_the_reader_does_not_import_torch():
  code = ('import sys; sys.modules["torch"] = None; '   # any `import torch` now fails
          'import score_sde.convert.torch_pickle')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.join(os.path.dirname(__file__), '..'))


# ----------------------------------------------------------------------------
# Against real torch, where a separate interpreter has it
# ----------------------------------------------------------------------------

_TORCH_SCRIPT = r'''
import sys, numpy as np, torch
out, fixture = sys.argv[1], sys.argv[2]
base = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
shared = {
    'transposed': base.t(), 'offset_slice': base[2, 3:9:2], 'block': base[1:4, 2:5],
    'scalar': base[3, 3], 'parameter': torch.nn.Parameter(base[4:].clone()),
    'bfloat16': (base[:2] * 3).to(torch.bfloat16)[:, 1::3],
    'float16': base.half().t()[2:5], 'int64': torch.arange(-5, 5, 3), 'bool': base[0] > 0.5,
    'uint16': torch.tensor([1, 65535, 300], dtype=torch.uint16)[1:],
    'size': base.shape, 'empty': base[:0],
    'with_attribute': base[1, :4].clone(), 'parameter_with_attribute': torch.nn.Parameter(base[2]),
}
shared['with_attribute'].note = 'x'              # pickled through _rebuild_from_type_v2
shared['parameter_with_attribute'].note = 'y'    # through _rebuild_parameter_with_state
torch.save(shared, out + '/real.pth')
arrays = {k: (v.float() if v.dtype in (torch.bfloat16, torch.uint16) else v).detach().numpy()
          for k, v in shared.items() if isinstance(v, torch.Tensor)}
model = torch.load(fixture, map_location='cpu', weights_only=True)['model']
arrays.update({'fixture/' + k: v.numpy() for k, v in model.items()})
np.savez(out + '/expected.npz', **arrays)
'''


def _torch_python_works():
  if not os.path.exists(TORCH_PYTHON):
    return False
  probe = subprocess.run([TORCH_PYTHON, '-c', 'import torch, numpy'], capture_output=True)
  return probe.returncode == 0


@pytest.mark.skipif(not _torch_python_works(), reason=(
    f'torch is optional and {TORCH_PYTHON} has none: set SCORE_SDE_TORCH_PYTHON to a Python '
    f'with torch to compare against files real torch.save writes now (the other tests read '
    f'the .pth files the original code base wrote, in shared/data/original_checkpoints)'))
def test_files_written_by_real_torch_save_match_torch(tmp_path):
  subprocess.run([TORCH_PYTHON, '-c', _TORCH_SCRIPT, str(tmp_path), FIXTURES[0]], check=True)
  expected = dict(np.load(tmp_path / 'expected.npz'))
  loaded = torch_pickle.load(tmp_path / 'real.pth')
  assert loaded['size'] == (6, 10)
  assert loaded['bfloat16'].dtype == ml_dtypes.bfloat16
  assert loaded['uint16'].dtype == np.uint16
  for key, value in loaded.items():
    if isinstance(value, np.ndarray):
      assert value.flags.c_contiguous and value.shape == expected[key].shape, key
      np.testing.assert_array_equal(value.astype(expected[key].dtype), expected[key], err_msg=key)
  model = torch_pickle.load(FIXTURES[0])['model']
  for key, value in model.items():
    assert value.dtype == expected[f'fixture/{key}'].dtype
    np.testing.assert_array_equal(value, expected[f'fixture/{key}'])
