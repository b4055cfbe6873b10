"""Faults (issue 19): bpd, the controllable jobs and training SIGKILLed at seeded random
points (while a shard computes, in the middle of an atomic write, during a checkpoint
write), re-run to completion and compared bitwise with an uninterrupted run; and progress
inside a single shard.

The kill points are drawn by np.random.default_rng(SEED) from the events of an
uninterrupted run, so every run of this file injects the same faults. Each kill is a real
SIGKILL that the worker process (tests/jobs_worker.py) sends itself at its chosen event;
the next worker process finishes the killed run, then is killed at the next point.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import jobs
from score_sde import locks
from score_sde import parallel
from score_sde import train
from score_sde.jobs import common
from tests import jobs_worker
from tests.test_jobs import _copy_trained
from tests.test_jobs import _tiny_digits_config
from tests.test_train import _assert_trees_equal
from tests.test_train import _load
from tests.train_worker import small_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 19                      # the number
KILLS_PER_JOB = {'bpd': 3, 'inpaint': 2, 'colorize': 2, 'cond_sample': 2}
TRAIN_ITERS = 40               # a checkpoint every 10 steps (small_toy_config)
TRAIN_KILL_STEPS = (10, 20, 30, 40)


# ----------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------

def _spawn(entry: str, spec: dict, spec_path: str) -> subprocess.Popen:
  """tests/jobs_worker.py's `entry`(spec) in a process with one CPU device."""
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count=1')
  return subprocess.Popen(
      [sys.executable, '-c', f'import sys; from tests.jobs_worker import {entry}; '
       f'{entry}(sys.argv[1])', spec_path], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


class Chain:
  """Runs worker processes one after the other; `stop` kills the running one."""

  def __init__(self):
    self.process, self.stopped = None, False

  def run(self, entry: str, spec: dict, spec_path: str) -> tuple[int, str]:
    if self.stopped:
      raise RuntimeError('the chain was stopped')
    self.process = _spawn(entry, spec, spec_path)
    output = self.process.communicate(timeout=600)[0]
    return self.process.returncode, output

  def stop(self):
    self.stopped = True
    if self.process is not None and self.process.poll() is None:
      self.process.kill()
      self.process.wait()


class Background:
  """work(chain) in a thread with its own Chain of worker processes, so that chains run
  beside each other and beside the in-process tests; result() waits for it."""

  def __init__(self, work):
    self.chain, self._outcome = Chain(), {}

    def run():
      try:
        self._outcome['value'] = work(self.chain)
      except BaseException as error:  # re-raised by result()
        self._outcome['error'] = error

    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()

  def result(self):
    self._thread.join()
    if 'error' in self._outcome:
      raise self._outcome['error']
    return self._outcome['value']

  def stop(self):
    self.chain.stop()
    self._thread.join(timeout=60)


def _assert_killed(code: int, output: str, what: str) -> None:
  assert code == -signal.SIGKILL and 'fault: SIGKILL' in output, (
      f'{what} was not killed (exit code {code}):\n{output[-3000:]}')


def _assert_finished(code: int, output: str, what: str) -> None:
  assert code in (0, -signal.SIGKILL), f'{what} failed (exit code {code}):\n{output[-3000:]}'
  assert 'fault: finished' in output, f'{what} did not finish:\n{output[-3000:]}'


# ----------------------------------------------------------------------------
# Comparing finished runs
# ----------------------------------------------------------------------------

def _outputs(root: str) -> tuple[set, list]:
  """(result files under root, relative; stale temporary files), the copied workdir's
  checkpoints and config aside."""
  found, temporaries = set(), []
  for directory, _, files in os.walk(root):
    relative = os.path.relpath(directory, root)
    if relative.startswith(os.path.join('wd', 'checkpoints')):
      continue
    for name in files:
      path = os.path.normpath(os.path.join(relative, name))
      if name.endswith('.tmp'):
        temporaries.append(path)
      elif not name.startswith('.') and path != os.path.join('wd', 'config.json'):
        found.add(path)
  return found, temporaries


def _differences(expected_root: str, root: str) -> list[str]:
  """What differs between two roots' results: npz arrays bitwise (and dtypes), JSON values
  (paths under the roots made equal), other files byte for byte."""
  names, _ = _outputs(expected_root)
  others, _ = _outputs(root)
  problems = [f'missing {n}' for n in sorted(names - others)]
  problems += [f'extra {n}' for n in sorted(others - names)]
  for name in sorted(names & others):
    a, b = os.path.join(expected_root, name), os.path.join(root, name)
    if name.endswith('.npz'):
      x, y = io.load_npz(a), io.load_npz(b)
      if sorted(x) != sorted(y) or any(x[k].dtype != y[k].dtype or x[k].shape != y[k].shape
                                       or x[k].tobytes() != y[k].tobytes() for k in x):
        problems.append(f'{name} differs')
    elif name.endswith('.json'):
      with open(a) as f, open(b) as g:
        if (json.loads(f.read().replace(expected_root, '<root>'))
            != json.loads(g.read().replace(root, '<root>'))):
          problems.append(f'{name} differs')
    else:
      with open(a, 'rb') as f, open(b, 'rb') as g:
        if f.read() != g.read():
          problems.append(f'{name} differs')
  return problems


def _stuck_locks(root: str) -> list[str]:
  """The lock files under root that cannot be taken now (every worker has exited)."""
  stuck = []
  for directory, _, files in os.walk(root):
    if locks.LOCK_FILE in files:
      try:
        with locks.hold(directory, 'fault check'):
          pass
      except locks.WorkdirLockedError:
        stuck.append(directory)
  return stuck


def _shard_files(root: str) -> int:
  return sum(name.startswith('shard_') and name.endswith('.npz')
             for _, _, files in os.walk(root) for name in files)


# ----------------------------------------------------------------------------
# Fixtures: a trained digits workdir, the two fault chains
# ----------------------------------------------------------------------------

def _run_train_chain(base: str, chain: Chain) -> dict:
  """Trains a reference run, then three runs each killed during one checkpoint write (a
  step and phase drawn with SEED) and finished by the next worker."""
  rng = np.random.default_rng(SEED)
  steps = rng.choice(TRAIN_KILL_STEPS, size=3, replace=False)
  phases = rng.permutation(jobs_worker.CHECKPOINT_PHASES)
  reference = os.path.join(base, 'reference')
  kills = [{'workdir': os.path.join(base, f'killed_{i}'), 'step': int(step), 'phase': str(phase)}
           for i, (step, phase) in enumerate(zip(steps, phases))]
  finish = [[reference, TRAIN_ITERS]]
  for i, kill in enumerate(kills + [None]):
    victim = None if kill is None else [kill['workdir'], TRAIN_ITERS, kill['step'],
                                        kill['phase']]
    code, output = chain.run('fault_train_main', {'finish': finish, 'victim': victim},
                             os.path.join(base, f'spec_{i}.json'))
    if i:      # the run killed before is finished first
      _assert_finished(code, output, f'the re-run of training killed at step '
                                     f'{kills[i - 1]["step"]}')
    if kill is None:
      assert code == 0, output[-3000:]
      break
    _assert_killed(code, output, f'training with a kill at step {kill["step"]} '
                                 f'({kill["phase"]})')
    kill['kill_message'] = re.search(r'fault: SIGKILL (.*)', output).group(1)
    directory = os.path.join(kill['workdir'], 'checkpoints')
    kill['left_after_kill'] = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    finish = [[kill['workdir'], TRAIN_ITERS]]
  return {'reference': reference, 'kills': kills}


@pytest.fixture(scope='module')
def train_faults(tmp_path_factory):
  """The training fault chain, started at once (it runs beside the digits training)."""
  base = str(tmp_path_factory.mktemp('train_faults'))
  chain = Background(lambda chain: _run_train_chain(base, chain))
  yield chain
  chain.stop()


def _fault_digits_config(data_dir: str):
  """tests/test_jobs.py's tiny digits config with a smaller network (one resolution, no
  attention): the likelihood program, compiled afresh by every bpd run, halves."""
  config = _tiny_digits_config(data_dir)
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.model.resblock_type = 'ddpm'
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, train_faults):
  del train_faults                     # started first: it runs beside this training
  directory = str(tmp_path_factory.mktemp('digits_run'))
  config = _fault_digits_config(str(tmp_path_factory.mktemp('tfds')))
  train.train_and_evaluate(config, directory, final_evaluation=False)
  return directory


def _run_job_chain(base: str, kinds, trained: str, params_dir: str, chain: Chain) -> dict:
  """The jobs of `kinds` run uninterrupted (their events recorded), then killed at points
  drawn from those events, each kill finished by the next worker. Returns
  {'references': {kind: root}, 'kills': [...]}."""
  references = {kind: _copy_trained(trained, os.path.join(base, f'reference_{kind}'))
                for kind in kinds}
  events_file = os.path.join(base, 'events.json')
  code, output = chain.run('fault_jobs_main', {
      'params_dir': params_dir, 'finish': [[k, r] for k, r in references.items()],
      'events_file': events_file}, os.path.join(base, 'spec_reference.json'))
  assert code == 0, output[-3000:]
  with open(events_file) as f:
    events = json.load(f)
  kills = []
  for kind in kinds:
    rng = np.random.default_rng([SEED, jobs_worker.FAULT_JOBS.index(kind)])
    names = events[references[kind]]
    # One point in each of KILLS_PER_JOB[kind] consecutive stretches of the run.
    stretches = np.array_split(np.arange(len(names)), KILLS_PER_JOB[kind])
    for index in [rng.choice(stretch) for stretch in stretches]:
      mode = ('computing' if names[index].startswith('compute ')
              else str(rng.choice(jobs_worker.WRITE_MODES)))
      kills.append({'kind': kind, 'index': int(index), 'mode': mode, 'event': names[index],
                    'root': _copy_trained(trained, os.path.join(base, f'killed_{len(kills)}'))})
  finish = []
  for i, kill in enumerate(kills + [None]):
    victim = None if kill is None else [kill['kind'], kill['root'], kill['index'], kill['mode']]
    code, output = chain.run('fault_jobs_main', {
        'params_dir': params_dir, 'finish': finish, 'victim': victim},
        os.path.join(base, f'spec_{i}.json'))
    if i:
      previous = kills[i - 1]
      _assert_finished(code, output, f'the re-run of {previous["kind"]}')
      done = re.findall(rf'into {re.escape(previous["root"])}\S*: \d+ shard\(s\) of \d+, '
                        rf'(\d+) already done', output)
      previous['already_done'] = [int(d) for d in done]
    if kill is None:
      assert code == 0, output[-3000:]
      break
    _assert_killed(code, output, f'{kill["kind"]} with a kill at {kill["event"]}')
    assert f'fault: SIGKILL at event {kill["index"]} ' in output, output[-3000:]
    kill['shards_after_kill'] = _shard_files(kill['root'])
    finish = [[kill['kind'], kill['root']]]
  return {'references': references, 'kills': kills}


JOB_GROUPS = {'bpd': ('bpd',), 'controllable': ('inpaint', 'colorize', 'cond_sample')}


@pytest.fixture(scope='module')
def job_faults(trained, tmp_path_factory):
  """Two job fault chains (bpd; the controllable jobs), started at once: {group: chain}."""
  base = str(tmp_path_factory.mktemp('job_faults'))
  params_dir = os.path.join(base, 'params')
  jobs_worker.write_fault_params(params_dir)
  from score_sde.evaluation import digits_classifier        # cond_sample's check, made once
  digits_classifier.get_digits_classifier(experiment_lib.load_config(trained))
  chains = {}
  for group, kinds in JOB_GROUPS.items():
    os.makedirs(os.path.join(base, group))
    chains[group] = Background(lambda chain, group=group, kinds=kinds: _run_job_chain(
        os.path.join(base, group), kinds, trained, params_dir, chain))
  yield chains
  for chain in chains.values():
    chain.stop()


def _check_job_kills(faults: dict, kinds) -> list[str]:
  """Problems of the killed runs of `kinds`, one line each; prints the tally."""
  problems, survived, litter = [], 0, 0
  killed = [k for k in faults['kills'] if k['kind'] in kinds]
  for kill in killed:
    where = f'{kill["kind"]} killed at event {kill["index"]} ({kill["event"]}, {kill["mode"]})'
    found = []
    # The re-run reports the shard files left by the kill as done: none lost or redone.
    if kill['already_done'] != [kill['shards_after_kill']]:
      found.append(f'the re-run found {kill["already_done"]} shard(s) done, '
                   f'{kill["shards_after_kill"]} were on disk')
    found += _differences(faults['references'][kill['kind']], kill['root'])
    found += [f'stuck lock in {d}' for d in _stuck_locks(kill['root'])]
    temporaries = _outputs(kill['root'])[1]
    found += [f'temporary file {t} left in a shard folder' for t in temporaries
              if '_shards' in t or '/bpd_' in t]
    litter += len(temporaries)
    survived += not found
    problems += [f'{where}: {p}' for p in found]
  print(f'\n{len(killed)} faults injected into {", ".join(kinds)}: {survived} re-ran to '
        f'bitwise the uninterrupted results; {len(problems)} problem(s); {litter} stale '
        f'temporary file(s) left outside shard folders.')
  for kill in killed:
    print(f'  {kill["kind"]:11s} event {kill["index"]:2d} {kill["mode"]:9s} {kill["event"]}')
  return problems


# ----------------------------------------------------------------------------
# Progress inside a shard
# ----------------------------------------------------------------------------

class _RecordingBar:
  """Stands in for the job's tqdm bar and records its count after each update."""

  def __init__(self):
    self.n, self.counts = 0, []

  def update(self, rows):
    self.n += rows
    self.counts.append(self.n)


def test_shard_progress_is_compiled_in_only_where_a_bar_shows_and_costs_no_cache_hit(
    monkeypatch):
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: False, raising=False)
  assert not common.ShardProgress(1.0, 1e-3, kept_in_cache=False).enabled   # no terminal
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True, raising=False)
  assert common.ShardProgress(1e-5, 1.0, kept_in_cache=False).enabled
  monkeypatch.setattr(common, 'persistent_cache_in_use', lambda: True)
  assert not common.ShardProgress(1.0, 1e-3).enabled      # a cached sampler stays cached
  monkeypatch.setattr(common, 'persistent_cache_in_use', lambda: False)
  assert common.ShardProgress(1.0, 1e-3).enabled
  score = lambda params, x, t: x * t  # noqa: E731
  assert common.ShardProgress(1.0, 1e-3, enabled=False).track(score) is score


def test_shard_progress_reports_the_slowest_example_under_vmap_and_never_goes_back():
  progress = common.ShardProgress(1.0, 0.0, enabled=True)     # T = 1 -> eps = 0
  score = progress.track(lambda params, x, t: params * x * t[:, None])
  bar = _RecordingBar()
  progress.begin(bar, 8)
  for t in ([1.0, 0.9], [0.75, 0.5], [0.8, 0.8], [0.25, 0.0]):  # 0, 2, (2), 6 rows of 8
    # vmap over an extra axis: one report, for the slowest (largest t) example.
    jax.block_until_ready(jax.vmap(score, in_axes=(None, 0, 0))(
        2.0, np.ones((2, 1, 3), np.float32), np.asarray(t, np.float32)[:, None]))
  jax.effects_barrier()
  assert bar.counts == [2, 6] and progress.end() == 6
  score(2.0, np.ones((1, 3), np.float32), np.zeros(1, np.float32))   # after end(): ignored
  jax.effects_barrier()
  assert bar.counts == [2, 6]


def _bar_counts(monkeypatch):
  """Forces the bar on (a terminal) and records its count after every update."""
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True, raising=False)
  counts, make_bar = [], common.progress_bar

  def recording_bar(*args, **kwargs):
    bar = make_bar(*args, **kwargs)
    update = bar.update

    def recorded_update(rows=1):
      result = update(rows)
      counts.append(bar.n)
      return result

    bar.update = recorded_update
    return bar

  monkeypatch.setattr(common, 'progress_bar', recording_bar)
  return counts


@pytest.mark.slow
def test_bpd_progress_moves_inside_one_shard_and_the_numbers_stay_the_same(
    trained, job_faults, monkeypatch, capsys):
  del job_faults                        # started first: its workers run beside this test
  config = experiment_lib.load_config(trained)
  mesh = parallel.make_mesh(jax.devices()[:1])

  def one_shard():
    return jobs.bpd_job(trained, config, batch_size=4, max_examples=4, mesh=mesh)

  quiet = one_shard()                                  # no terminal: no callback, no bar
  out_dir = quiet['shard_dir']
  expected = io.load_npz(common.shard_path(out_dir, 0))
  shutil.rmtree(out_dir)
  os.remove(quiet['result_file'])
  counts = _bar_counts(monkeypatch)
  shown = one_shard()
  assert shown == quiet
  got = io.load_npz(common.shard_path(out_dir, 0))
  assert got['bpd'].tobytes() == expected['bpd'].tobytes()             # bitwise
  np.testing.assert_array_equal(got['nfe'], expected['nfe'])
  # The single shard of 4 examples moved the bar before it ended.
  assert counts[-1] == 4 and any(0 < c < 4 for c in counts), counts
  assert '4/4' in capsys.readouterr().out.split('\r')[-1]


@pytest.mark.slow
def test_sample_and_inpaint_progress_moves_inside_one_shard_without_a_persistent_cache(
    trained, job_faults, monkeypatch):
  del job_faults                        # started first: its workers run beside this test
  config = experiment_lib.load_config(trained)
  mesh = parallel.make_mesh(jax.devices()[:1])
  images = np.full((2, 8, 8, 1), 0.5, np.float32)
  jobs_to_run = {   # one shard each: 4 samples, 2 inpaintings
      'sample': lambda tag: common.shard_path(jobs.sample_job(
          trained, config, num_samples=4, shard_size=4, tag=tag, mesh=mesh, save_floats=True), 0),
      'inpaint': lambda tag: jobs.inpaint_job(
          trained, config, images, 'center_box', mesh=mesh,
          out_dir=os.path.join(trained, 'inpaint_' + tag))['npz']}
  quiet = {name: io.load_npz(job('quiet')) for name, job in jobs_to_run.items()}
  monkeypatch.setattr(common, 'persistent_cache_in_use', lambda: False)
  counts = _bar_counts(monkeypatch)
  for name, job in jobs_to_run.items():
    counts.clear()
    shown = io.load_npz(job('shown'))
    assert sorted(shown) == sorted(quiet[name])
    for key in shown:
      assert shown[key].tobytes() == quiet[name][key].tobytes(), (name, key)    # bitwise
    rows = 4 if name == 'sample' else 2
    assert counts[-1] == rows and any(0 < c < rows for c in counts), (name, counts)


# ----------------------------------------------------------------------------
# SIGKILL at random points, then a re-run: bitwise the uninterrupted results
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_bpd_killed_at_random_points_reruns_to_the_uninterrupted_numbers(job_faults):
  problems = _check_job_kills(job_faults['bpd'].result(), JOB_GROUPS['bpd'])
  assert not problems, '\n'.join(problems)


@pytest.mark.slow
def test_controllable_jobs_killed_at_random_points_rerun_to_the_uninterrupted_files(
    job_faults):
  problems = _check_job_kills(job_faults['controllable'].result(), JOB_GROUPS['controllable'])
  assert not problems, '\n'.join(problems)


@pytest.mark.slow
def test_training_killed_during_checkpoint_writes_resumes_to_the_same_state(train_faults):
  faults = train_faults.result()
  config = small_toy_config(TRAIN_ITERS)
  ref_state, ref_step, ref_next = _load(faults['reference'], config, with_data=True)
  assert ref_step == TRAIN_ITERS
  print(f'\n{len(faults["kills"])} training runs killed during a checkpoint write:')
  for kill in faults['kills']:
    print(f'  step >= {kill["step"]} {kill["phase"]:13s} killed {kill["kill_message"]}; '
          f'left {kill["left_after_kill"]}')
    written = [n for n in kill['left_after_kill'] if n.endswith('.orbax-checkpoint-tmp')]
    if kill['phase'] != 'after_commit':     # killed with the step half written
      assert written, kill
    state, step, next_batch = _load(kill['workdir'], config, with_data=True)
    assert step == TRAIN_ITERS
    _assert_trees_equal(ref_state, state, exact=True)   # params, EMA, optimizer, step, key
    np.testing.assert_array_equal(ref_next, next_batch)
    remaining = os.listdir(os.path.join(kill['workdir'], 'checkpoints'))
    assert not [n for n in remaining if 'tmp' in n], remaining   # the half write is gone
    assert not _stuck_locks(kill['workdir'])
