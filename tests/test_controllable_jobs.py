"""Controllable-generation jobs over a workdir (what launch.py calls): image and mask files,
the npz / PNG / JSON outputs, and the three jobs with an injected train state."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from score_sde import controllable
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import parallel
from score_sde.jobs import controllable as controllable_jobs

KEY = jax.random.PRNGKey(0)


def test_load_images_and_masks_from_files(tmp_path):
  rgb = (np.arange(2 * 4 * 4 * 3) % 256).astype(np.uint8).reshape(2, 4, 4, 3)
  for i in range(2):
    Image.fromarray(rgb[i]).save(tmp_path / f'img{i}.png')
  loaded = io.load_images(str(tmp_path), 4, 3)
  np.testing.assert_allclose(loaded, rgb / 255.0, atol=1e-7)
  np.savez(tmp_path / 'digits.npz', images=np.full((3, 4, 4, 1), 16, np.uint8), levels=17)
  np.testing.assert_allclose(io.load_images(str(tmp_path / 'digits.npz'), 4, 1), 1.0)
  mask_png = np.full((4, 4), 255, np.uint8)
  mask_png[1:3, 1:3] = 0
  Image.fromarray(mask_png).save(tmp_path / 'mask.png')
  mask = controllable_jobs.load_mask(str(tmp_path / 'mask.png'), 4, 3)
  assert mask.shape == (4, 4, 3) and mask.sum() == 12 * 3 and np.all(mask[1:3, 1:3] == 0)
  assert controllable_jobs.load_mask('left half', 4, 3).shape == (4, 4, 3)


def test_outputs_npz_and_png_grid(tmp_path):
  inputs = np.random.default_rng(0).uniform(size=(3, 4, 4, 3)).astype(np.float32)
  masks = np.broadcast_to(controllable.make_mask('left half', 4, 3), inputs.shape)
  results = np.stack([inputs, 1 - inputs], axis=1)                  # 2 samples per input
  paths = controllable_jobs.save_inpainting(str(tmp_path), inputs, masks, results,
                                       info={'nfe': 10})
  with np.load(paths['npz']) as f:
    np.testing.assert_allclose(f['results'], results)
    np.testing.assert_array_equal(f['masks'], masks)
  grid = np.asarray(Image.open(paths['png']))
  scale = 64 // 4
  # 3 rows, 4 columns (masked input, mask, 2 results), 1-pixel padding, enlarged.
  assert grid.shape == ((3 * 5 + 1) * scale, (4 * 5 + 1) * scale, 3)
  with open(os.path.join(tmp_path, 'inpainting.json')) as f:
    assert json.load(f)['nfe'] == 10
  paths = controllable_jobs.save_conditional_samples(str(tmp_path), inputs, np.array([0, 1, 1])[:3])
  assert os.path.exists(paths['npz'])


def test_grey_panels_part_their_tiles_with_lines_no_grey_image_has(tmp_path):
  # A mask that is white at its edges used to blend into white padding.
  white, black = np.ones((2, 3, 3, 1), np.float32), np.zeros((2, 3, 3, 1), np.float32)
  path = io.panel_grid(str(tmp_path / 'panel.png'), [white, black], scale=1)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * 4 + 1, 2 * 4 + 1, 3)
  line = np.round(np.asarray(io.PANEL_LINE_COLOR) * 255)
  lines = np.zeros(grid.shape[:2], bool)
  lines[::4, :] = lines[:, ::4] = True
  np.testing.assert_array_equal(grid[lines], np.broadcast_to(line, (lines.sum(), 3)))
  tiles = grid[~lines].reshape(2, 3, 2, 3, 3).transpose(0, 2, 1, 3, 4)   # row, column, H, W, C
  assert (tiles[:, 0] == 255).all() and (tiles[:, 1] == 0).all()
  assert len(set(line)) == 3                      # a colour, not a grey


def tiny_rgb_config():
  from configs import defaults
  config = defaults.digits_ncsnpp(defaults.cifar10(), nf=8)
  config.data.image_size = 8
  config.data.centered = True
  config.training.sde = 'vpsde'
  config.model.num_scales = 50      # DDPM betas up to 20 / N: N >= 21
  config.model.ch_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.resblock_type = 'ddpm'
  config.sampling.predictor = 'reverse_diffusion'
  config.sampling.corrector = 'none'
  config.eval.batch_size = 4
  return config


@pytest.mark.slow
def test_jobs_write_npz_png_and_json(tmp_path):
  from types import SimpleNamespace

  from score_sde import models
  from score_sde.models import utils as model_utils
  config = tiny_rgb_config()
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(KEY, experiment.model, config)
  state = SimpleNamespace(ema_params=params)
  images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  mesh = parallel.make_mesh(jax.devices()[:2])

  paths = controllable_jobs.inpaint_job(str(tmp_path), config, images, 'center box', mesh=mesh,
                                   samples_per_image=2, state=state, step=7)
  with np.load(paths['npz']) as f:
    results, masks = f['results'], f['masks']
  assert results.shape == (3, 2, 8, 8, 3) and masks.shape == (3, 8, 8, 3)
  known = masks.astype(bool)
  np.testing.assert_allclose(results[:, 0][known], images[known], atol=1e-6)
  np.testing.assert_allclose(results[:, 1][known], images[known], atol=1e-6)
  assert np.all(np.isfinite(results))
  assert 'step7' in paths['npz'] and os.path.exists(paths['png'])
  shards = os.path.join(os.path.dirname(paths['npz']), 'inpainting_shards')
  written = sorted(f for f in os.listdir(shards) if f != '.lock')
  assert written == ['manifest.json', 'shard_00000.npz', 'shard_00001.npz']
  with open(os.path.join(shards, 'manifest.json')) as f:   # 6 inputs in shards of 4
    manifest = json.load(f)
  assert manifest['shard_size'] == 4 and manifest['samples_per_image'] == 2
  assert manifest['shards']['1']['nfe'] == 50          # N = 50 steps, no corrector
  again = controllable_jobs.inpaint_job(str(tmp_path), config, images, 'center box', mesh=mesh,
                                        samples_per_image=2, state=state, step=7)
  with np.load(again['npz']) as f:             # a re-run only reassembles the shards
    np.testing.assert_array_equal(f['results'], results)
  other = controllable_jobs.inpaint_job(str(tmp_path), config, images[::-1], 'center box',
                                        mesh=mesh, samples_per_image=2, state=state, step=7)
  assert os.path.dirname(other['npz']) != os.path.dirname(paths['npz'])   # its own folder
  with np.load(paths['npz']) as f:
    np.testing.assert_array_equal(f['results'], results)                  # untouched
  with pytest.raises(ValueError, match=r'holds shards made with a different inputs .*; pass '
                                       r'another --out_dir or delete the folder'):
    controllable_jobs.inpaint_job(str(tmp_path), config, images[::-1], 'center box',
                                  mesh=mesh, samples_per_image=2, state=state, step=7,
                                  out_dir=os.path.dirname(paths['npz']))

  paths = controllable_jobs.colorize_job(str(tmp_path), config, images, mesh=mesh, state=state,
                                    step=7)
  with np.load(paths['npz']) as f:
    colour = f['results'][:, 0]
    np.testing.assert_allclose(f['originals'], images)
  np.testing.assert_allclose(colour.mean(-1), images.mean(-1), atol=1e-5)

  classifier_config = tiny_rgb_config()
  classifier_config.model.name = 'wideresnet'
  classifier_config.model.blocks_per_group = 1
  classifier_config.model.channel_multiplier = 1
  classifier_config.model.base_channels = 8
  classifier_config.model.embedding_size = 16
  classifier = models.get_model(classifier_config)
  classifier_params = classifier.init(KEY, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))['params']
  labels = np.repeat(np.arange(3), 2)
  paths = controllable_jobs.conditional_sample_job(
      str(tmp_path), config, str(tmp_path / 'classifier'), classifier_config, labels,
      scale=2.0, mesh=mesh, state=state, step=7,
      classifier_state=SimpleNamespace(ema_params=classifier_params), classifier_step=3)
  with np.load(paths['npz']) as f:
    assert f['samples'].shape == (6, 8, 8, 3) and np.all(np.isfinite(f['samples']))
    np.testing.assert_array_equal(f['labels'], labels)
  with open(paths['npz'].replace('.npz', '.json')) as f:
    meta = json.load(f)
  assert meta['scale'] == 2.0 and meta['classifier_step'] == 3
  # another classifier with the same config and step (another run's weights) gets its
  # own folder: its samples never land beside the first classifier's
  other_params = classifier.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)),
                                 jnp.ones((1,)))['params']
  other = controllable_jobs.conditional_sample_job(
      str(tmp_path), config, str(tmp_path / 'classifier_2'), classifier_config, labels,
      scale=2.0, mesh=mesh, state=state, step=7,
      classifier_state=SimpleNamespace(ema_params=other_params), classifier_step=3)
  assert os.path.dirname(other['npz']) != os.path.dirname(paths['npz'])
  with pytest.raises(ValueError, match='holds shards made with a different classifier_params'):
    controllable_jobs.conditional_sample_job(
        str(tmp_path), config, str(tmp_path / 'classifier_2'), classifier_config, labels,
        scale=2.0, mesh=mesh, state=state, step=7,
        classifier_state=SimpleNamespace(ema_params=other_params), classifier_step=3,
        out_dir=os.path.dirname(paths['npz']))
  with pytest.raises(ValueError, match='class index 10 is out of range'):
    controllable_jobs.conditional_sample_job(
        str(tmp_path), config, '', classifier_config, [10], mesh=mesh, state=state, step=7,
        classifier_state=SimpleNamespace(ema_params=classifier_params))


def test_bad_image_files_are_rejected(tmp_path):
  np.save(tmp_path / 'big.npy', np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='8x8 but the model takes 4x4'):
    io.load_images(str(tmp_path / 'big.npy'), 4, 3)
  with pytest.raises(ValueError, match='3 channel.*takes 1'):
    io.load_images(str(tmp_path / 'big.npy'), 8, 1)
  np.save(tmp_path / 'range.npy', np.full((1, 4, 4, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
    io.load_images(str(tmp_path / 'range.npy'), 4, 3)


def test_a_file_that_is_not_an_image_is_a_clear_error(tmp_path):
  (tmp_path / 'notes.png').write_text('this is not a PNG')
  with pytest.raises(ValueError, match=r'notes.png is not an image file that can be read .*'
                                       r'pass PNG / JPEG files'):
    io.load_images(str(tmp_path / 'notes.png'), 4, 3)
