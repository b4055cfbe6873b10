"""The bits/dim job: exact likelihood of a split through the probability-flow ODE, or a
normalizing flow's exact change of variables (same files, same JSON; 'solver' says which).

  <workdir>/eval/bpd_<split>_<step>_<id>/shard_*.npz    per-shard bits/dim and NFE
  <workdir>/eval/bpd_<split>_<step>_<id>/manifest.json   settings, NFE per shard
  <workdir>/eval/bpd_<split>_<step>_<id>_r<R>.json      mean over R repeats, standard
                                                         error, NFE, settings

<id> (`common.settings_id`) names every setting that determines the numbers
(split, a digest of the examples it reads, checkpoint, solver and its
tolerances, divergence estimator, shard size, config), so a run with other settings
computes into another folder and never reports shards made with different ones. More
repeats extend the folder's shards; each repeat count R has its own result file, so a
later run with fewer repeats does not replace a result that averaged more.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import flows
from score_sde import io
from score_sde import likelihood
from score_sde import parallel
from score_sde.evaluation import baselines as baselines_lib
from score_sde.jobs import common


LIKELIHOOD_EPS = 1e-5   # the reference's lower end of the likelihood ODE


@dataclasses.dataclass(frozen=True)
class LikelihoodSettings:
  rtol: float = 1e-5
  atol: float = 1e-5
  solver: str = 'tsit5'
  divergence: str = 'hutchinson_rademacher'
  num_probes: int = 1
  eps: float = LIKELIHOOD_EPS
  precision: str = 'highest'     # matmul precision of the likelihood program


def settings_from_config(config) -> LikelihoodSettings:
  """The likelihood settings config.eval names (rtol, atol, matmul_precision)."""
  return LikelihoodSettings(
      rtol=config.eval.get('rtol', 1e-5), atol=config.eval.get('atol', 1e-5),
      precision=likelihood.check_precision(config.eval.get('matmul_precision', 'highest')))


def flow_solver_description(settings: LikelihoodSettings) -> dict:
  """What determines a flow's bits/dim (recorded as the JSON's 'solver'): the exact
  change of variables at the settings' matmul precision; no ODE tolerances."""
  return {'method': 'change_of_variables', 'precision': settings.precision}


def bpd_job(workdir: str, config, *, split: str = 'test', num_repeats: int = 1,
            batch_size: int | None = None, checkpoint: int | None = None,
            settings: LikelihoodSettings | None = None, max_examples: int | None = None,
            mesh=None, state=None, step: int | None = None) -> dict:
  """Bits/dim of a split through the probability-flow ODE (a flow's: exactly, by the
  change of variables), resumable and sharded.

  Shard s = r * num_batches + b is batch b of repeat r (the last batch zero-padded
  to the batch size B, a device multiple), with key fold_in(PRNGKey(seed + 7), s)
  split into dequantisation noise and Hutchinson probes (unused by a flow): each
  repeat draws fresh ones. More repeats extend a finished job. Writes
  <workdir>/eval/bpd_<split>_<step>_<id>_r<R>.json (see the module doc) and returns
  its contents (with 'result_file': that path, and 'shard_dir': the shards' folder).
  """
  mesh = mesh or parallel.make_mesh()
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  settings = settings or settings_from_config(config)
  solver = (flow_solver_description(settings) if experiment.is_flow
            else dataclasses.asdict(settings))
  levels = experiment.num_levels
  if levels < 2:
    raise ValueError(f'bits/dim need quantised data; {config.data.dataset} is continuous.')
  uint = data_lib.load_split_uint(config, split, max_examples)       # [n, H, W, C]
  n, dim = len(uint), int(np.prod(uint.shape[1:]))
  source = data_lib.tfds_split(config, split)
  trained_on, held_out = _check_held_out(workdir, config, split, source)
  # The examples' digest joins the address: the same split name can read other data
  # (benchmarks/flows_validation.py's held-out digits, another dataset version).
  data_digest = common.digest(uint)
  batch_size = parallel.round_up_to_devices(min(int(batch_size or config.eval.batch_size), n),
                                            mesh)
  num_batches = common.count_shards(n, batch_size)
  determining = {'split': split, 'checkpoint_step': int(step), 'num_examples': int(n),
                 'data': data_digest, 'solver': solver,
                 'run_hash': experiment_lib.run_hash(config), 'shard_size': batch_size}
  out_dir = os.path.join(workdir, 'eval',
                         f'bpd_{split}_{step}_{common.settings_id(determining)}')
  job = common.Job(
      out_dir=out_dir, num_shards=num_repeats * num_batches, shard_size=batch_size,
      settings={'split': split, 'tfds_split': source, 'checkpoint_step': int(step),
                'num_examples': int(n), 'data': data_digest, 'num_repeats': int(num_repeats),
                'solver': solver, 'run_hash': experiment_lib.run_hash(config)},
      checked=('split', 'checkpoint_step', 'num_examples', 'data', 'solver', 'run_hash',
               'shard_size'),
      title=(f'bits/dim of {n} {split} examples{_tfds_note(split, source)}'
             f'{" (training data)" if held_out is False else ""} x {num_repeats} '
             f'repeat(s) from step {step} into {out_dir}'),
      what=f'bits/dim ({split})', unit='example',
      retry_hint='run with the earlier settings', num_rows=n)
  if experiment.is_flow:        # exact: one forward pass, no solver
    progress = None
    likelihood_fn = flows.get_likelihood_fn(experiment.model_fn, precision=settings.precision,
                                            mesh=mesh)
  else:  # The ODE runs eps -> T; diffrax's program is never kept in the compilation cache.
    progress = common.ShardProgress(settings.eps, experiment.sde.T, kept_in_cache=False)
    likelihood_fn = likelihood.get_likelihood_fn(
        experiment.sde, progress.track(experiment.score_model_fn), mesh=mesh,
        **dataclasses.asdict(settings))
  params = common.ema_params(state, mesh)
  scaler = data_lib.get_data_scaler(config)
  inverse = data_lib.get_data_inverse_scaler(config)
  base_key = jax.random.PRNGKey(config.seed + 7)

  def compute(shard):
    rows = uint[common.shard_rows(shard % num_batches, batch_size, n)]
    valid = len(rows)
    key_deq, key_probe = jax.random.split(common.shard_key(base_key, shard))
    x = common.pad_rows(rows, batch_size, fill=0).astype(np.float32) / (levels - 1)
    x = np.asarray(scaler(likelihood.uniform_dequantize(key_deq, x, levels)))
    logp, _, info = likelihood_fn(key_probe, params, parallel.host_to_global(x, mesh))
    bpd = np.asarray(likelihood.bits_per_dim(parallel.gather(logp), dim, inverse, levels))
    nfe = np.asarray(parallel.gather(info['nfe_per_example']))
    return ({'bpd': bpd[:valid].astype(np.float64), 'nfe': nfe[:valid]},
            {'nfe': int(np.asarray(info['nfe']))})

  common.run(job, compute, progress)
  shards = common.load_shards(job)
  bpds = np.concatenate([a['bpd'] for a in shards]).reshape(num_repeats, n)
  per_example = bpds.mean(axis=0)            # average the repeats of each example
  nfes = np.concatenate([a['nfe'] for a in shards])
  result = {
      'split': split, 'tfds_split': source, 'data': data_digest, 'trained_on': trained_on,
      'held_out': held_out,
      'checkpoint_step': int(step), 'num_examples': int(n),
      'num_repeats': int(num_repeats), 'bpd': float(per_example.mean()),
      'bpd_stderr': float(per_example.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan'),
      'num_levels': int(levels), 'dim': dim,
      'nfe_mean': float(nfes.mean()), 'nfe_min': int(nfes.min()), 'nfe_max': int(nfes.max()),
      'solver': solver, 'run_hash': experiment_lib.run_hash(config),
      'shard_size': int(batch_size), 'shard_dir': out_dir,
      'result_file': f'{out_dir}_r{num_repeats}.json',
  }
  if jax.process_index() == 0:
    io.atomic_json(result['result_file'], result)
  return result


def _check_held_out(workdir: str, config, split: str,
                    source: str) -> tuple[str | None, bool | None]:
  """(the tfds split the workdir's model trained on, whether `source` is disjoint from
  it); (None, None) when not recorded. Refuses bits/dim of a split other than 'train'
  that shares examples with the training data although the dataset has a held-out
  split: it would be reported as held out and it is not. (CelebA-HQ and FFHQ have
  none: their 'test' is the training data, recorded as held_out False.)"""
  trained = experiment_lib.training_data_splits(workdir)
  if trained is None:
    return None, None
  shared = data_lib.shared_examples(config, source, trained['train'])
  has_held_out = not data_lib.shared_examples(config, data_lib.tfds_split(config, 'test'),
                                              data_lib.tfds_split(config, 'train'))
  if shared and split != 'train' and has_held_out:
    raise ValueError(
        f'{split!r} reads tfds {source!r} here, and the model in {workdir} trained on tfds '
        f'{trained["train"]!r} ({experiment_lib.DATA_SPLITS_FILE}): {shared} examples in '
        f'common, so its bits/dim would not be held out. Run the job with the splits it '
        f'trained on (benchmarks/flows_validation.py --holdout N -- bpd ... for a '
        f'validation run), or ask for --split train to measure training data on purpose.')
  return trained['train'], not shared


def _tfds_note(split: str, source: str) -> str:
  return '' if source == split else f' (tfds {source})'


def baselines(config, split: str = 'test') -> dict:
  """Uniform and per-pixel-histogram bits/dim on the same split and levels."""
  levels = data_lib.num_levels(config)
  train_uint = data_lib.load_split_uint(config, 'train')
  test_uint = data_lib.load_split_uint(config, split)
  return {'uniform': baselines_lib.uniform_bpd(levels),
          'pixel_histogram': baselines_lib.pixel_histogram_bpd(train_uint, test_uint, levels)}
