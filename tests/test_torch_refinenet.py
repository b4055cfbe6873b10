"""score_sde_pytorch NCSN / NCSNv2 checkpoints: names mapped by structure, scores as the original's.

The fixtures in tests/data/original_torch/ were written by score_sde_pytorch's own code
(make_fixtures.py there; the port's RefineNets need small patches to run at all, listed
in each fixture.json). Their `expected.npz` holds the original score with the EMA
weights twice: with the port's numerics (`score`) and with the two numerical
conventions of the Flax original and of this project (`score_flax_conventions`:
biased variance of the channel means in InstanceNorm++, half-pixel bilinear resizing).
"""
import functools
import importlib
import json
import os

import numpy as np
import pytest

from score_sde import experiment as experiment_lib
from score_sde.convert import original
from score_sde.convert import torch_refinenet
from score_sde.convert import torch_state
from score_sde.models import ncsnv2
from score_sde.models import utils as model_utils

DATA = os.path.join(os.path.dirname(__file__), 'data', 'original_torch')
FITS_OUR_WIDTHS = ('ve_ncsnv2_bedroom_128', 've_ncsnv2_bedroom_256')
PORT_WIDTHS = ('ve_ncsnv2_cifar10', 've_ncsn_cifar10')
RTOL = 1e-5


def _fixture(name):
  with open(os.path.join(DATA, name, 'fixture.json')) as f:
    return json.load(f)


def _config(fixture, **extra):
  config = importlib.import_module(
      fixture['config'][:-len('.py')].replace('/', '.')).get_config()
  for key, value in {**fixture['overrides'], **extra}.items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@functools.lru_cache(maxsize=None)
def _checkpoint(name):
  fixture = _fixture(name)
  return torch_state.read(os.path.join(DATA, name, fixture['checkpoint']))


def _options(fixture, numerics):
  """config.model options for the port's function ('port') or for the Flax
  original's numerics with the port's RefineBlock widths ('flax')."""
  port = torch_refinenet.port_model_options(fixture['model'])
  if numerics == 'port':
    return {f'model.{key}': value for key, value in port.items()}
  return {'model.refine_mults': port['refine_mults']}


@functools.lru_cache(maxsize=None)
def _imported(name, numerics='flax'):
  """(mapped EMA, mapped training params, target, score_model_fn) for a fixture."""
  fixture = _fixture(name)
  config = _config(fixture, **_options(fixture, numerics))
  experiment = experiment_lib.build_experiment(config)
  model, score_model_fn = experiment.model, experiment.score_model_fn
  target = model_utils.param_shapes_in_order(model, config)
  checkpoint = _checkpoint(name)
  ema = torch_state.to_ours(checkpoint.ema_params, target, config.model.name)
  params = torch_state.to_ours(checkpoint.params, target, config.model.name)
  return ema, params, tuple(target), score_model_fn


def _relative_error(ours, expected):
  return float(np.max(np.abs(np.asarray(ours) - expected)) / np.max(np.abs(expected)))


@functools.lru_cache(maxsize=None)
def _score(name, numerics, which='ema'):
  ema, params, _, score_model_fn = _imported(name, numerics)
  expected = np.load(os.path.join(DATA, name, 'expected.npz'))
  tree = original.unflatten(ema if which == 'ema' else params)
  return np.asarray(score_model_fn(tree, expected['x'], expected['t'])), expected


NAMES = FITS_OUR_WIDTHS + PORT_WIDTHS


@pytest.mark.parametrize('name', NAMES)
def test_checkpoint_fills_the_network_exactly(name):
  ema, params, target, _ = _imported(name)
  for mapped in (ema, params):
    assert not [key for key in mapped if key.startswith('(unplaced)')]
    original.check_against(mapped, target, source=name, config_name=name)
  assert len(ema) == len(target)


@pytest.mark.parametrize('name', NAMES)
def test_score_equals_the_ports_own_numerics(name):
  """With the port's options (unbiased variances, align_corners, widths) our network
  computes score_sde_pytorch's own score."""
  ours, expected = _score(name, 'port')
  assert _relative_error(ours, expected['score']) < RTOL


@pytest.mark.parametrize('name', NAMES)
def test_score_under_flax_conventions_equals_the_patched_original(name):
  """The same weights under our default numerics equal the port's code run with the
  Flax original's conventions: each option is what separates the two functions."""
  ours, expected = _score(name, 'flax')
  assert _relative_error(ours, expected['score_flax_conventions']) < RTOL
  assert _relative_error(ours, expected['score']) > 1e-2


@pytest.mark.parametrize('name', [FITS_OUR_WIDTHS[0], PORT_WIDTHS[-1]])
def test_training_weights_give_another_score(name):
  """The fixture's EMA differs from the parameters, so the tests above see which was used."""
  ours, expected = _score(name, 'port', which='params')
  assert _relative_error(ours, expected['score']) > 1e-3


@pytest.mark.parametrize('name', PORT_WIDTHS)
def test_port_decoder_width_is_named_against_our_config(name):
  """score_sde_pytorch's NCSN / NCSNv2 (32-64 px) give the third RefineBlock nf
  channels, the Flax original (and our default) 2 nf: without model.refine_mults
  the mismatch names those arrays."""
  fixture = _fixture(name)
  config = _config(fixture)
  model = experiment_lib.build_experiment(config).model
  target = model_utils.param_shapes_in_order(model, config)
  mapped = torch_state.to_ours(_checkpoint(name).ema_params, target, config.model.name)
  with pytest.raises(original.CheckpointMismatchError,
                     match=r'RefineBlock_2/MSFBlock_0/Conv_0/kernel file \(3, 3, 12, 6\) '
                           r'vs config \(3, 3, 12, 12\)'):
    original.check_against(mapped, target, source=name, config_name=fixture['config'])


def test_wrong_width_fails_naming_the_arrays():
  name = 've_ncsnv2_bedroom_128'
  fixture = _fixture(name)
  config = _config(fixture, **{'model.nf': 16})
  target = model_utils.param_shapes_in_order(
      experiment_lib.build_experiment(config).model, config)
  mapped = torch_state.to_ours(_checkpoint(name).ema_params, target, config.model.name)
  with pytest.raises(original.CheckpointMismatchError,
                     match=r'Conv_0/kernel file \(3, 3, 3, 4\) vs config \(3, 3, 3, 16\).*'
                           r'model\.nf'):
    original.check_against(mapped, target, source=name, config_name=fixture['config'])


def test_other_network_fails_naming_the_unplaced_arrays():
  """An NCSNv2_256 file against an NCSNv2_128 config: its extra stage has no place."""
  fixture = _fixture('ve_ncsnv2_bedroom_128')
  config = _config(fixture)
  target = model_utils.param_shapes_in_order(
      experiment_lib.build_experiment(config).model, config)
  mapped = torch_state.to_ours(_checkpoint('ve_ncsnv2_bedroom_256').ema_params, target,
                               config.model.name)
  with pytest.raises(original.CheckpointMismatchError,
                     match=r'have no place in the config.s network: \(unplaced\) res31\.0\.'):
    original.check_against(mapped, target, source='256', config_name=fixture['config'])


def test_refine31_is_the_third_refine_block_of_ncsnv2_256():
  """refine31 is created after refine3 but runs before it, as our RefineBlock_2."""
  _, _, target, _ = _imported('ve_ncsnv2_bedroom_256')
  weight = _checkpoint('ve_ncsnv2_bedroom_256').ema_params[
      'refine31.msf.convs.0.weight']
  mapped = torch_refinenet.to_ours({'refine31.msf.convs.0.weight': weight}, target,
                                   'ncsnv2_256')
  np.testing.assert_array_equal(mapped['RefineBlock_2/MSFBlock_0/Conv_0/kernel'],
                                weight.transpose(2, 3, 1, 0))


def test_embedding_rows_split_into_gamma_alpha_beta():
  num_classes, c = 3, 2
  embed = np.arange(num_classes * 3 * c, dtype=np.float32).reshape(num_classes, 3 * c)
  target = [(f'ConditionalInstanceNormPlus_0/{leaf}', (num_classes, c))
            for leaf in ('gamma', 'alpha', 'beta')]
  mapped = torch_refinenet.to_ours({'normalizer.embed.weight': embed}, target, 'ncsn')
  np.testing.assert_array_equal(mapped['ConditionalInstanceNormPlus_0/gamma'], embed[:, :c])
  np.testing.assert_array_equal(mapped['ConditionalInstanceNormPlus_0/alpha'],
                                embed[:, c:2 * c])
  np.testing.assert_array_equal(mapped['ConditionalInstanceNormPlus_0/beta'], embed[:, 2 * c:])


def test_arrays_without_a_place_are_kept_as_unplaced():
  flat = {'res4.0.conv2.conv.1.weight': np.zeros((4, 4, 3, 3), np.float32),  # adjust_padding
          'res9.0.conv1.weight': np.zeros((4, 4, 3, 3), np.float32)}
  mapped = torch_refinenet.to_ours(flat, [], 'ncsnv2')
  assert sorted(mapped) == ['(unplaced) res4.0.conv2.conv.1.weight',
                            '(unplaced) res9.0.conv1.weight']


def test_unknown_model_name_lists_the_refinenets():
  with pytest.raises(ValueError, match=r"'ncsnpp' is not a RefineNet model .*valid: "
                                       r"\['ncsn', 'ncsnv2'"):
    torch_refinenet.to_ours({}, [], 'ncsnpp')


def test_adam_moments_and_ema_settings_are_read_by_parameter_index():
  """torch's Adam state_dict indexes parameters in parameters() order (the state dict
  without buffers). These fixtures' moments are non-zero (the shared NCSN++ / DDPM ones
  hold zeros), so exp_avg and exp_avg_sq cannot be confused unseen."""
  from score_sde.convert import torch_pickle
  name = 've_ncsnv2_cifar10'
  raw = torch_pickle.load(os.path.join(DATA, name, _fixture(name)['checkpoint']))
  checkpoint = _checkpoint(name)
  names = [key[len('module.'):] for key in raw['model'] if key != 'module.sigmas']
  adam = raw['optimizer']
  assert adam['param_groups'][0]['params'] == list(range(len(names)))
  assert sorted(checkpoint.adam_mu) == sorted(checkpoint.adam_nu) == sorted(names)
  for index, key in enumerate(names):
    np.testing.assert_array_equal(checkpoint.adam_mu[key], adam['state'][index]['exp_avg'])
    np.testing.assert_array_equal(checkpoint.adam_nu[key], adam['state'][index]['exp_avg_sq'])
  # Independent of the file's names: second moments are squares, first ones are not.
  assert all((v >= 0).all() for v in checkpoint.adam_nu.values())
  assert any((m < 0).any() for m in checkpoint.adam_mu.values())
  assert checkpoint.adam_count == int(adam['state'][0]['step']) > 0
  assert checkpoint.learning_rate == adam['param_groups'][0]['lr']
  assert checkpoint.ema_rate == raw['ema']['decay'] and checkpoint.step == raw['step']
