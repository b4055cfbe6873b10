"""The first thing to run on a new GPU / TPU host: one JSON object per measurement.

For the paper's NCSN++ continuous VE config (CIFAR-10, 32x32; `--config` for
another) on synthetic data, in float32 and bfloat16 compute:

  devices      backend, device kinds and count, jax / jaxlib versions
  peak         a large bfloat16 matmul's FLOP/s (measured) and the table's peak
  train        compile seconds, step seconds (median), examples/s, the FLOPs XLA
               counts for one step, achieved FLOP/s and its fraction of the peak
  sample       PC (`--pc_steps`) and dpmpp_2m (`--dpm_steps`): samples/s, NFE
  bpd          the likelihood ODE (Hutchinson divergence, as the bpd job) at
               rtol = atol = 1e-5, matmul precision 'highest': examples/s and NFE
  memory       peak device memory (bytes) so far, after each stage, where the
               backend tells (JAX has no public reset: a stage's figure
               includes the stages before it)

FLOPs are XLA's cost analysis of the compiled program, which on a sharded
program counts one device's part: `xla_flops_per_step_per_device`, times the
device count for the whole step. Batches are per device times the device count;
each process feeds its own devices (multi-process hosts work too).

It needs jax, flax, optax, orbax-checkpoint, diffrax, numpy and three pure-Python
wheels (ml_collections, absl-py, tqdm); no tensorflow-datasets, grain or
TensorBoard, no data files, no private JAX APIs, and none of the CPU-only
settings (flat parameters, XLA:CPU flags, huge pages). `--tiny` shrinks
everything so that it runs on a CPU in about a minute (the tests run it so).

  python benchmarks/device_check.py [--tiny] [--batch_per_device 128]
      [--stages train,sample,bpd] [--dtypes float32,bfloat16]

What good looks like: see the README's "On a new accelerator host".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_CONFIG = 'configs/ve/cifar10_ncsnpp_continuous.py'

# Dense peak FLOP/s per chip (vendor data sheets; SXM parts): bfloat16 tensor cores,
# and the float32 matmul path JAX's default precision takes (TF32 tensor cores on
# A100 / H100 / H200; bfloat16 passes on TPU). Matched against device_kind.
# A pattern matches whole words of device_kind (case-insensitive); first match wins.
PEAK_FLOPS = (
    (r'H200', {'bfloat16': 989e12, 'float32': 494e12}),
    (r'H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    (r'H100', {'bfloat16': 989e12, 'float32': 494e12}),      # SXM
    (r'A100', {'bfloat16': 312e12, 'float32': 156e12}),
    (r'L40S', {'bfloat16': 362e12, 'float32': 183e12}),
    (r'L4', {'bfloat16': 121e12, 'float32': 60e12}),
    (r'V100', {'bfloat16': 125e12, 'float32': 15.7e12}),     # bfloat16: its float16 peak
    (r'TPU v6', {'bfloat16': 918e12, 'float32': 918e12}),
    (r'TPU v5p', {'bfloat16': 459e12, 'float32': 459e12}),
    (r'TPU v5( lite|e)', {'bfloat16': 197e12, 'float32': 197e12}),
    (r'TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
)


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def table_peak(device_kind: str, dtype: str) -> float | None:
  """Data-sheet peak FLOP/s of one `device_kind` chip for `dtype` (None: not in the table)."""
  import re
  for pattern, peaks in PEAK_FLOPS:
    if re.search(rf'(^|\W){pattern}(\W|$)', device_kind, flags=re.IGNORECASE):
      return peaks[dtype]
  return None


def peak_memory() -> int | None:
  """Largest peak_bytes_in_use over the local devices (None where not reported)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:   # noqa: BLE001 - some backends raise instead of returning None
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def xla_flops(compiled) -> float | None:
  """FLOPs XLA counts for one call of a compiled program (None if it does not say)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:   # noqa: BLE001
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def timed(fn, *args, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn(*args), each waited for."""
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return seconds


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

def load_config(path: str, tiny: bool):
  import configs
  config = configs.load(path)
  if tiny:                                      # a few seconds per compile on a CPU
    config.data.image_size = min(16, int(config.data.image_size))
    config.model.nf = 8
    config.model.ch_mult = tuple(config.model.ch_mult)[:2]
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
  config.training.param_layout = 'tree'        # the accelerator form, whatever the backend
  return config


def with_dtype(config, dtype: str):
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  return config


def synthetic_batch(config, per_device: int, mesh, seed: int = 0) -> jax.Array:
  """The global batch [per_device x devices, H, W, C] of float32 images uniform in
  the model's data range, sharded on 'data'; this process makes its devices' rows."""
  from score_sde import data as data_lib
  from score_sde import parallel
  from score_sde.models import utils as model_utils
  shape = model_utils.input_shape(config, per_device * jax.local_device_count())
  rng = np.random.default_rng([seed, jax.process_index()])
  unit = rng.uniform(size=shape).astype(np.float32)
  return parallel.global_batch(np.asarray(data_lib.get_data_scaler(config)(unit), np.float32),
                               mesh)


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------

def measure_peak(tiny: bool) -> dict:
  n = 512 if tiny else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  seconds = min(timed(matmul, a, a, repeats=3 if tiny else 10))
  kind = jax.devices()[0].device_kind
  return {'measurement': 'peak', 'matmul': [n, n, n], 'dtype': 'bfloat16',
          'measured_flops_per_s': 2 * n ** 3 / seconds,
          'table_flops_per_s': {dt: table_peak(kind, dt) for dt in ('bfloat16', 'float32')}}


def measure_train(config, dtype: str, per_device: int, steps: int,
                  measured_peak: float | None) -> dict:
  from score_sde import experiment as experiment_lib
  from score_sde import parallel
  from score_sde import train
  config = with_dtype(config, dtype)
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn, _ = train.loss_fns(config, experiment)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=config.model.ema_rate)
  state = experiment_lib.init_train_state(jax.random.PRNGKey(0), model=experiment.model,
                                          config=config, optimizer=optimizer)
  state = jax.device_put(state, parallel.replicated(mesh))
  batch_array = synthetic_batch(config, per_device, mesh)
  batch = int(batch_array.shape[0])
  p_step = train.jit_train_step(step, mesh, layout='tree')
  start = time.perf_counter()
  compiled = p_step.lower(state, batch_array).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, batch_array)                      # warm-up
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_array)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  step_s = statistics.median(seconds)
  per_device_flops = xla_flops(compiled)            # one device's part of the step
  devices = jax.device_count()
  peak = table_peak(jax.devices()[0].device_kind, dtype)
  achieved = per_device_flops / step_s if per_device_flops else None     # per device
  return {'measurement': 'train', 'dtype': dtype, 'batch': batch, 'devices': devices,
          'compile_s': round(compile_s, 2), 'step_s': step_s,
          'examples_per_s': batch / step_s, 'examples_per_s_per_device': batch / step_s / devices,
          'xla_flops_per_step_per_device': per_device_flops,
          'xla_flops_per_example': (per_device_flops * devices / batch
                                    if per_device_flops else None),
          'achieved_flops_per_s_per_device': achieved,
          'fraction_of_table_peak': achieved / peak if achieved and peak else None,
          'fraction_of_measured_bf16_matmul': (achieved / measured_peak
                                               if achieved and measured_peak else None),
          'loss_finite': bool(np.isfinite(np.asarray(metrics['loss'])).all()),
          'peak_memory_bytes_so_far': peak_memory()}


def measure_sampling(config, dtype: str, batch: int, method: str, num_steps: int) -> dict:
  from score_sde import experiment as experiment_lib
  from score_sde import parallel
  from score_sde import sampling
  from score_sde.models import utils as model_utils
  config = with_dtype(config, dtype)
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  params = jax.device_put(
      model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config),
      parallel.replicated(mesh))
  sampler = sampling.jit_sampler(sampling.build_sampler(
      experiment.sde, experiment.score_model_fn, model_utils.input_shape(config, batch),
      method, mesh=mesh, num_steps=num_steps, eps=experiment.sampling_eps), mesh)
  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  compiled = sampler.lower(key, params).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(key, params))
  seconds = min(timed(compiled, key, params, repeats=2))
  x, info = compiled(key, params)
  nfe = int(np.asarray(info['nfe']))
  return {'measurement': 'sample', 'method': method, 'dtype': dtype, 'num_steps': num_steps,
          'batch': batch, 'nfe': nfe, 'compile_s': round(compile_s, 2), 'seconds': seconds,
          'samples_per_s': batch / seconds, 'score_evals_per_s': batch * nfe / seconds,
          'finite': bool(np.isfinite(np.asarray(x)).all()),
          'peak_memory_bytes_so_far': peak_memory()}


def measure_bpd(config, per_device: int, rtol: float) -> dict:
  from score_sde import experiment as experiment_lib
  from score_sde import likelihood
  from score_sde import parallel
  from score_sde.models import utils as model_utils
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  params = jax.device_put(
      model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config),
      parallel.replicated(mesh))
  fn = likelihood.get_likelihood_fn(experiment.sde, experiment.score_model_fn, rtol=rtol,
                                    atol=rtol, precision='highest', mesh=mesh)
  x = synthetic_batch(config, per_device, mesh, seed=1)
  batch = int(x.shape[0])
  key = jax.random.PRNGKey(2)
  start = time.perf_counter()
  compiled = fn.lower(key, params, x).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  logp, _, info = jax.block_until_ready(compiled(key, params, x))
  seconds = time.perf_counter() - start
  return {'measurement': 'bpd', 'batch': batch, 'rtol': rtol, 'precision': 'highest',
          'compile_s': round(compile_s, 2), 'seconds': seconds,
          'examples_per_s': batch / seconds, 'nfe_max': int(np.asarray(info['nfe'])),
          'nfe_mean': float(np.mean(np.asarray(info['nfe_per_example']))),
          'finite': bool(np.isfinite(np.asarray(logp)).all()),
          'peak_memory_bytes_so_far': peak_memory()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--tiny', action='store_true', help='a minute on a CPU (tests)')
  parser.add_argument('--batch_per_device', type=int, default=0,
                      help='default: config.training.batch_size (128 for the paper '
                           'NCSN++), 2 with --tiny')
  parser.add_argument('--stages', default='peak,train,sample,bpd')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--train_steps', type=int, default=0, help='timed steps (default 20)')
  parser.add_argument('--pc_steps', type=int, default=0, help='PC steps (default 100)')
  parser.add_argument('--dpm_steps', type=int, default=10)
  parser.add_argument('--bpd_batch_per_device', type=int, default=0,
                      help='default 32, 2 with --tiny')
  args = parser.parse_args(argv)
  tiny = args.tiny
  config = load_config(args.config, tiny)
  devices = jax.devices()
  per_device = args.batch_per_device or (2 if tiny else int(config.training.batch_size))
  batch = per_device * len(devices)
  stages = [s for s in args.stages.split(',') if s]
  dtypes = [d for d in args.dtypes.split(',') if d]
  emit({'measurement': 'devices', 'backend': jax.default_backend(),
        'device_kinds': sorted({d.device_kind for d in devices}), 'device_count': len(devices),
        'process_count': jax.process_count(), 'jax': jax.__version__,
        'jaxlib': getattr(__import__('jaxlib'), '__version__', None),
        'config': args.config, 'tiny': tiny, 'batch_per_device': per_device})
  measured_peak = None
  if 'peak' in stages:
    record = measure_peak(tiny)
    measured_peak = record['measured_flops_per_s']
    emit(record)
  if 'train' in stages:
    for dtype in dtypes:
      emit(measure_train(config, dtype, per_device, args.train_steps or (3 if tiny else 20),
                         measured_peak))
  if 'sample' in stages:
    for dtype in dtypes:
      emit(measure_sampling(config, dtype, batch, 'pc', args.pc_steps or (3 if tiny else 100)))
      emit(measure_sampling(config, dtype, batch, 'dpmpp_2m', args.dpm_steps))
  if 'bpd' in stages:
    emit(measure_bpd(config, args.bpd_batch_per_device or (2 if tiny else 32),
                     1e-2 if tiny else 1e-5))


if __name__ == '__main__':
  main()
