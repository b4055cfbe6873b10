"""Every model family of configs/digits trains through the one loop and samples with its sampler."""
import os

import jax
import numpy as np
import pytest

import configs
from score_sde import io
from score_sde import sampling
from score_sde import train
from score_sde.models import utils as model_utils
from score_sde import experiment as experiment_lib

FAMILIES = ['ncsn', 'ncsnv2', 'ddpm', 'iddpm', 've_ncsnpp_continuous', 'ddpmpp_continuous',
            'subvp_ddpmpp_continuous']


def _small(name, data_dir):
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', f'{name}.py'))
  training = config.training
  training.n_iters = 100
  training.batch_size = 16
  training.log_freq = 1
  training.eval_freq = 0
  training.snapshot_freq = 0
  training.snapshot_freq_for_preemption = 0
  training.snapshot_sampling = False
  config.eval.enable_bpd = False
  config.data.data_dir = data_dir
  model = config.model
  model.nf = 8 if model.name in ('ncsn', 'ncsnv2', 'ncsnpp') else 32
  if model.name == 'ddpm':
    model.ch_mult = (1,)
    model.num_res_blocks = 1
    model.attn_resolutions = (8,)
  if model.name == 'ncsnpp':
    model.num_res_blocks = 1
  if not training.continuous and model.name == 'ddpm':
    model.num_scales = 100             # a shorter chain keeps ancestral sampling quick
  if training.continuous:
    config.sampling.num_steps = 50     # a short sampler run: this test checks plumbing
  config.sampling.n_steps_each = min(config.sampling.n_steps_each, 2)
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.slow
@pytest.mark.parametrize('name', FAMILIES)
def test_family_trains_and_samples(name, data_dir, tmp_path):
  config = _small(name, data_dir)
  state = train.train_and_evaluate(config, str(tmp_path), final_evaluation=False)
  loss = [r['loss'] for r in io.read_metrics(str(tmp_path)) if 'loss' in r]
  assert len(loss) == 100
  first, last = np.mean(loss[:20]), np.mean(loss[-20:])
  assert last < 0.8 * first, (name, first, last)

  experiment = experiment_lib.build_experiment(config)
  sampler = sampling.get_sampling_fn(config, experiment.sde, experiment.score_model_fn,
                                     model_utils.input_shape(config, 4),
                                     experiment.sampling_eps)
  x, info = sampler(jax.random.PRNGKey(0), state.ema_params)
  assert x.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(x)).all()
  assert int(info['nfe']) > 0
