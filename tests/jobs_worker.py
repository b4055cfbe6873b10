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


# ----------------------------------------------------------------------------
# Fault injection (tests/test_faults.py): a job or a training run SIGKILLed at a chosen
# event, after finishing the runs that earlier kills interrupted
# ----------------------------------------------------------------------------

FAULT_JOBS = ('bpd', 'inpaint', 'colorize', 'cond_sample')
WRITE_MODES = ('partial', 'unrenamed', 'renamed')   # how a kill meets an atomic write
CHECKPOINT_PHASES = ('tmp_dir', 'before_commit', 'after_commit')


def write_fault_params(params_dir: str) -> None:
  """Fresh parameters (seed 0) of the RGB model (colorize) and of the digits classifier
  (cond_sample) as msgpack files, so the workers need not initialise them."""
  import flax.serialization
  import jax
  import jax.numpy as jnp

  from score_sde import experiment as experiment_lib
  from score_sde import models
  from score_sde.models import utils as model_utils
  from tests.test_controllable_jobs import tiny_rgb_config
  key = jax.random.PRNGKey(0)
  classifier = models.get_model(tiny_digits_classifier_config())
  trees = {
      'rgb': model_utils.init_params(key, experiment_lib.build_experiment(
          tiny_rgb_config()).model, tiny_rgb_config()),
      'classifier': jax.jit(classifier.init)(key, jnp.zeros((1, 8, 8, 1)),
                                             jnp.ones((1,)))['params']}
  os.makedirs(params_dir, exist_ok=True)
  for name, tree in trees.items():
    with open(os.path.join(params_dir, f'{name}.msgpack'), 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(tree)))


def _fault_params(params_dir: str, name: str) -> SimpleNamespace:
  import flax.serialization
  with open(os.path.join(params_dir, f'{name}.msgpack'), 'rb') as f:
    return SimpleNamespace(ema_params=flax.serialization.msgpack_restore(f.read()))


def fault_job(kind: str, root: str, params_dir: str, mesh):
  """A small job of `kind` (3 shards of 2 rows) with its outputs under `root` (root/wd:
  the trained digits workdir)."""
  import numpy as np

  from score_sde import data as data_lib
  from score_sde import experiment as experiment_lib
  from score_sde import jobs
  from tests.test_controllable_jobs import tiny_rgb_config

  workdir = os.path.join(root, 'wd')
  config = experiment_lib.load_config(workdir)
  config.eval.batch_size = 2
  if kind == 'bpd':
    config.eval.rtol = config.eval.atol = 1e-2
    return lambda: jobs.bpd_job(workdir, config, batch_size=2, max_examples=6, mesh=mesh)
  if kind == 'inpaint':
    images = data_lib.load_split_uint(config, 'test', 3).astype(np.float32) / 16.0
    return lambda: jobs.inpaint_job(workdir, config, images, 'center_box', samples_per_image=2,
                                    out_dir=os.path.join(root, 'inpaint'), mesh=mesh)
  if kind == 'colorize':
    rgb_config = tiny_rgb_config()
    rgb_config.eval.batch_size = 2
    rgb = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    return lambda: jobs.colorize_job(
        os.path.join(root, 'rgb'), rgb_config, rgb, samples_per_image=2,
        state=_fault_params(params_dir, 'rgb'), step=0, out_dir=os.path.join(root, 'colorize'),
        mesh=mesh)
  if kind == 'cond_sample':
    return lambda: jobs.conditional_sample_job(
        workdir, config, 'classifier', tiny_digits_classifier_config(), np.arange(5), scale=2.0,
        out_dir=os.path.join(root, 'cond_sample'), mesh=mesh,
        classifier_state=_fault_params(params_dir, 'classifier'), classifier_step=0)
  raise ValueError(f'unknown fault job {kind!r}; one of {FAULT_JOBS}.')


def _sigkill(message: str) -> None:
  import signal
  print(f'fault: SIGKILL {message}', flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


class JobEvents:
  """Numbers a job's events under `root`: the start of each shard's computation and each
  atomic write (os.replace of a temporary file); with `kill_at` = (index, mode) the
  process SIGKILLs itself at that event: while the shard computes ('computing'), with
  the temporary file cut to half its size ('partial'), complete but not renamed
  ('unrenamed') or just after the rename ('renamed'). `start` makes it the one that
  the (once patched) os.replace and common.run report to."""

  current = None

  def __init__(self, root: str, kill_at=None):
    self.root, self.kill_at, self.names = os.path.abspath(root), kill_at, []

  def start(self) -> 'JobEvents':
    if JobEvents.current is None:
      _patch_for_job_events()
    JobEvents.current = self
    return self

  def event(self, name: str, moment: str, temporary: str | None = None) -> None:
    if moment != 'after':
      self.names.append(name)
    if self.kill_at is None or self.kill_at[0] != len(self.names) - 1:
      return
    index, mode = self.kill_at
    if moment == 'before' and mode in ('computing', 'partial', 'unrenamed'):
      if mode == 'partial':
        os.truncate(temporary, os.path.getsize(temporary) // 2)
      _sigkill(f'at event {index} ({name}, {mode})')
    if moment == 'after' and mode == 'renamed':
      _sigkill(f'at event {index} ({name}, {mode})')


def _patch_for_job_events() -> None:
  from score_sde.jobs import common
  replace, run = os.replace, common.run

  def watched_replace(src, dst, *args, **kwargs):
    events, target = JobEvents.current, os.path.abspath(dst)
    inside = target.startswith(events.root + os.sep)
    name = 'write ' + os.path.relpath(target, events.root) if inside else None
    if inside:
      events.event(name, 'before', src)
    replace(src, dst, *args, **kwargs)
    if inside:
      events.event(name, 'after')

  def watched_run(job, compute, *args, **kwargs):
    events = JobEvents.current
    where = os.path.relpath(os.path.abspath(job.out_dir), events.root)

    def watched_compute(shard):
      events.event(f'compute {where} {shard}', 'before')
      return compute(shard)

    return run(job, watched_compute, *args, **kwargs)

  os.replace, common.run = watched_replace, watched_run


def fault_jobs_main(spec_path: str) -> None:
  """Runs the spec's jobs to completion (spec['finish']: [kind, root] pairs; with
  spec['events_file'], their event names are written there as {root: names}), then
  spec['victim'] ([kind, root, index, mode]) with its kill armed."""
  import json
  with open(spec_path) as f:
    spec = json.load(f)
  from score_sde.cpu import xla_flags
  xla_flags.apply_default_flags()
  from score_sde import parallel
  mesh = parallel.make_mesh()
  recorded = {}
  for kind, root in spec['finish']:
    events = JobEvents(root).start()
    fault_job(kind, root, spec['params_dir'], mesh)()
    recorded[root] = events.names
    print(f'fault: finished {kind} in {root}', flush=True)
  if spec.get('events_file'):
    with open(spec['events_file'], 'w') as f:
      json.dump(recorded, f)
  if spec.get('victim'):
    kind, root, index, mode = spec['victim']
    JobEvents(root, (index, mode)).start()
    fault_job(kind, root, spec['params_dir'], mesh)()
    print(f'fault: the kill point {index} of {kind} was never reached', flush=True)
    sys.exit(3)


class CheckpointKill:
  """SIGKILLs the process during the write of the first checkpoint of a step >= `step`:
  as soon as its temporary directory appears ('tmp_dir', seen by a thread polling
  <workdir>/checkpoints), when every item is written but the step not yet renamed
  ('before_commit') or just after the rename ('after_commit')."""

  def __init__(self, workdir: str, step: int, phase: str):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.step, self.phase = int(step), phase

  def _due(self, name: str) -> bool:
    head = name.split('.', 1)[0]
    return head.isdigit() and int(head) >= self.step

  def _watch(self) -> None:
    import time
    while True:
      try:
        names = os.listdir(self.directory)
      except FileNotFoundError:
        names = []
      for name in names:
        if name.endswith('.orbax-checkpoint-tmp') and self._due(name):
          _sigkill(f'with {name} in {self.directory} (tmp_dir)')
      time.sleep(0.0005)

  def install(self) -> None:
    if self.phase == 'tmp_dir':
      import threading
      sys.setswitchinterval(0.0005)
      threading.Thread(target=self._watch, daemon=True).start()
      return
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    kill = self

    async def finalize_then_maybe_kill(self, *args, **kwargs):
      final = self.get_final()
      step_level = os.path.dirname(os.path.abspath(str(final))) == kill.directory
      due = step_level and kill._due(os.path.basename(str(final)))
      if due and kill.phase == 'before_commit':
        _sigkill(f'before {self.get()} is renamed (before_commit)')
      result = await finalize(self, *args, **kwargs)
      if due and kill.phase == 'after_commit':
        _sigkill(f'after {final} was renamed (after_commit)')
      return result

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_maybe_kill


def fault_train_main(spec_path: str) -> None:
  """Finishes spec['finish'] ([workdir, n_iters] pairs: tests/train_worker.py's toy
  config), then trains spec['victim'] ([workdir, n_iters, step, phase]) with a kill
  during the write of the checkpoint of a step >= step."""
  import json
  with open(spec_path) as f:
    spec = json.load(f)
  from score_sde import train
  from tests.train_worker import small_toy_config
  for workdir, n_iters in spec['finish']:
    train.train_and_evaluate(small_toy_config(n_iters), workdir)
    print(f'fault: finished training {workdir}', flush=True)
  if spec.get('victim'):
    workdir, n_iters, step, phase = spec['victim']
    CheckpointKill(workdir, step, phase).install()
    train.train_and_evaluate(small_toy_config(n_iters), workdir)
    print(f'fault: the checkpoint kill at step {step} ({phase}) was never reached', flush=True)
    sys.exit(3)
