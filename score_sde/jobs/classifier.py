"""The trained noise-conditional classifier's test accuracy by noise level."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import losses
from score_sde import parallel
from score_sde.jobs import common

# Times at which a trained classifier's test accuracy is reported (t = 0.01:
# nearly clean images; t = 1: the prior, where chance level is expected).
CLASSIFIER_EVAL_TIMES = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)


def evaluate_classifier(experiment, state, step: int, workdir: str, mesh,
                        times=CLASSIFIER_EVAL_TIMES) -> dict:
  """Test-split accuracy of the EMA classifier on x_t ~ p_0t(. | x_0) at fixed times.

  One noise draw per example and time (key fold_in(seed + 3, time index)).
  Writes <workdir>/eval/classifier_accuracy_<step>_<id>.json {t: accuracy} and
  returns it (with the number of examples and 'result_file'); <id> names what the
  noise draws depend on (batch size, times, seed, config, the test data's tfds split).
  """
  config = experiment.config
  n_dev = mesh.devices.size
  batch = max(int(config.eval.batch_size) // n_dev, 1) * n_dev
  labels = data_lib.load_split_labels(config, 'test')
  data_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)

  def count_correct(params, key, images, batch_labels, valid, t):
    logits_fn = lambda x, t: experiment.model_fn(params, x, t)   # noqa: E731
    correct = losses.classifier_correct(logits_fn, experiment.sde, key, images,
                                              batch_labels, t)
    return jnp.sum(correct & valid)

  p_count = jax.jit(count_correct, in_shardings=(replicated, replicated, data_sharding,
                                                 data_sharding, data_sharding, None),
                    out_shardings=replicated)
  local = batch // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  correct = np.zeros(len(times), np.int64)
  for index, (images, valid) in enumerate(
      data_lib.eval_batches(config, 'test', batch_size=batch)):
    start = index * batch
    batch_labels = np.zeros(batch, np.int32)
    batch_labels[:int(valid.sum())] = labels[start:start + int(valid.sum())]
    arrays = jax.tree.map(lambda a: parallel.global_batch(a, mesh),
                          (images[rows], batch_labels[rows], valid[rows]))
    for j, t in enumerate(times):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), j), index)
      correct[j] += int(p_count(state.ema_params, key, *arrays, float(t)))
  accuracy = {f'{t:g}': float(c) / len(labels) for t, c in zip(times, correct)}
  determining = {'batch_size': batch, 'times': [float(t) for t in times], 'seed': config.seed,
                 'run_hash': experiment_lib.run_hash(config),
                 'tfds_split': data_lib.tfds_split(config, 'test')}
  path = os.path.join(workdir, 'eval',
                      f'classifier_accuracy_{step}_{common.settings_id(determining)}.json')
  result = {'step': int(step), 'num_examples': len(labels), 'accuracy_by_time': accuracy,
            **determining, 'result_file': path}
  if jax.process_index() == 0:
    io.atomic_json(path, result)
    table = ', '.join(f't={t}: {a:.3f}' for t, a in accuracy.items())
    print(f'Classifier test accuracy (EMA, {len(labels)} examples, x_t ~ p_0t): {table}\n'
          f'Written to {path}', flush=True)
  return result
