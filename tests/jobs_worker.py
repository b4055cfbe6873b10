"""Runs the six jobs (sample, bpd, eval, inpaint, colorize, cond_sample) on small inputs
(the multi-process and interrupt/resume tests of tests/test_jobs.py).

python tests/jobs_worker.py <root> [--interrupted_root <root2>]
                             [--cluster <coordinator> <num_processes> <process_id>]

<root>/wd is a trained digits workdir (tests/test_jobs.py's, copied without its
outputs); every output goes under <root>. Devices per process come from
XLA_FLAGS (set by the test); with a coordinator the processes form one JAX
cluster over gloo CPU collectives and the jobs run on the mesh of all devices.
With --interrupted_root, each job also runs in <root2> (a copy of <root>), is
stopped after its first shard and run again (one process: the compiled
programs serve both).
Colourisation needs an RGB model and cond_sample a classifier: both use freshly
initialised parameters (seed 0), handed to the jobs as states.
"""
import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def tiny_digits_classifier_config():
  import configs
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', 'wrn_classifier.py'))
  config.model.channel_multiplier = 1
  config.model.base_channels = 8
  config.model.embedding_size = 16
  return config


def job_steps(root: str, mesh) -> list:
  """[(name, run)] for the six jobs, in an order that works (eval reads the samples)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from score_sde import data as data_lib
  from score_sde import experiment as experiment_lib
  from score_sde import jobs
  from score_sde import models
  from score_sde.models import utils as model_utils
  from tests.test_controllable_jobs import tiny_rgb_config

  workdir = os.path.join(root, 'wd')
  config = experiment_lib.load_config(workdir)
  config.eval.batch_size = 4                     # shards of 4: 2 or 3 shards per job
  images = data_lib.load_split_uint(config, 'test', 3).astype(np.float32) / 16.0
  key = jax.random.PRNGKey(0)
  classifier_config = tiny_digits_classifier_config()
  classifier = models.get_model(classifier_config)
  classifier_state = SimpleNamespace(ema_params=classifier.init(
      key, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))['params'])
  rgb_config = tiny_rgb_config()
  rgb_state = SimpleNamespace(ema_params=model_utils.init_params(
      key, experiment_lib.build_experiment(rgb_config).model, rgb_config))
  rgb = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  return [
      ('sample', lambda: jobs.sample_job(workdir, config, num_samples=10, shard_size=4,
                                         tag='t', save_floats=True, mesh=mesh)),
      ('bpd', lambda: jobs.bpd_job(workdir, config, num_repeats=1, batch_size=4,
                                   max_examples=10, mesh=mesh)),
      ('eval', lambda: jobs.eval_job(workdir, config, tag='t', mesh=mesh)),
      ('inpaint', lambda: jobs.inpaint_job(
          workdir, config, images, 'center_box', samples_per_image=2,
          out_dir=os.path.join(root, 'inpaint'), mesh=mesh)),
      ('colorize', lambda: jobs.colorize_job(
          os.path.join(root, 'rgb'), rgb_config, rgb, samples_per_image=2, state=rgb_state,
          step=0, out_dir=os.path.join(root, 'colorize'), mesh=mesh)),
      ('cond_sample', lambda: jobs.conditional_sample_job(
          workdir, config, 'classifier', classifier_config, np.arange(5), scale=2.0,
          out_dir=os.path.join(root, 'cond_sample'), mesh=mesh,
          classifier_state=classifier_state, classifier_step=0)),
  ]


class Crash(Exception):
  """A simulated kill."""


def crash_after_first_shard(run) -> None:
  """Runs a job whose second shard file is never written (as if killed after the
  manifest recorded the shard, before its file); the job's first shard is kept."""
  from score_sde.jobs import common
  save_shard, written = common.save_shard, []

  def save_one_then_crash(out_dir, shard, arrays):
    if written:
      raise Crash()
    written.append(shard)
    return save_shard(out_dir, shard, arrays)

  common.save_shard = save_one_then_crash
  try:
    run()
  except Crash:
    return
  finally:
    common.save_shard = save_shard
  raise AssertionError('the job finished without writing a second shard')


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('root')
  parser.add_argument('--interrupted_root', help='also run every job there, interrupted '
                      'after its first shard and run again')
  parser.add_argument('--cluster', nargs=3, metavar=('COORDINATOR', 'PROCESSES', 'ID'))
  args = parser.parse_args(argv[1:])
  from score_sde.cpu import xla_flags
  xla_flags.apply_default_flags()               # the flags the tests' own process runs with
  from score_sde import parallel
  if args.cluster:
    address, processes, index = args.cluster
    parallel.initialize_distributed(address, int(processes), int(index),
                                    cpu_collectives='gloo')
  mesh = parallel.make_mesh()
  steps = job_steps(args.root, mesh)
  interrupted = job_steps(args.interrupted_root, mesh) if args.interrupted_root else None
  for i, (name, run) in enumerate(steps):
    run()
    print(f'worker: {name} done', flush=True)
    if interrupted:
      crash_after_first_shard(interrupted[i][1])
      print(f'worker: {name} interrupted', flush=True)
      interrupted[i][1]()
      print(f'worker: {name} resumed', flush=True)


if __name__ == '__main__':
  main(sys.argv)
