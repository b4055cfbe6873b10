"""Bad command lines end in one line that names the problem and the fix (launch.py), and
nothing is written outside the workdir."""
import json
import os
import re
import subprocess
import sys

import numpy as np

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch.py')


def _run(*args, code=None):
  env = dict(os.environ, PYTHONPATH=ROOT, SCORE_SDE_HUGEPAGES='0')
  command = [sys.executable, '-c', code, *args] if code else [sys.executable, LAUNCH, *args]
  return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                        timeout=300)


def _one_line_error(out, pattern):
  assert out.returncode in (1, 2), out
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith('error: ')
  assert re.search(pattern, lines[0]), lines[0]


def _stored_config(workdir, config_file):
  os.makedirs(workdir, exist_ok=True)
  config = configs.load(os.path.join(configs.CONFIG_DIR, *config_file.split('/')))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())


def test_a_missing_or_foreign_workdir(tmp_path):
  _one_line_error(_run('sample', f'--workdir={tmp_path / "nope"}'),
                  r'no workdir at .*nope; train one first with launch.py train')
  _one_line_error(_run('bpd', f'--workdir={tmp_path}'),
                  r'has no config.json: it is not a score_sde workdir')
  _one_line_error(_run('sample'), r'needs --workdir=')
  _one_line_error(_run('sample', '--workdir='), r'needs --workdir=')       # given empty


def test_a_malformed_config_json(tmp_path):
  (tmp_path / 'config.json').write_text('{not json')
  _one_line_error(_run('sample', f'--workdir={tmp_path}'),
                  r'config.json is not valid JSON .*restore it from a backup')


def test_a_classifier_workdir_given_to_a_score_model_command(tmp_path):
  _stored_config(str(tmp_path), 'digits/wrn_classifier.py')
  _one_line_error(_run('sample', f'--workdir={tmp_path}'),
                  r'holds a noise-conditional classifier .* sample needs a score-model workdir')


def test_a_sampler_override_on_a_flow_is_refused_not_ignored(tmp_path):
  _stored_config(str(tmp_path), 'digits/realnvp.py')
  _one_line_error(_run('sample', f'--workdir={tmp_path}', '--config.sampling.method=ode'),
                  r"--config.sampling.method=ode: 'realnvp' is a normalizing flow, which "
                  r"samples by one inverse pass; of the sampling.\* keys only "
                  r"sampling.temperature applies")
  _one_line_error(_run('train', '--config=configs/digits/nice.py', f'--workdir={tmp_path / "w"}',
                       '--config.sampling.num_steps=10'),
                  r"--config.sampling.num_steps=10: 'nice' is a normalizing flow")
  assert not os.path.exists(tmp_path / 'w')
  # the temperature reaches the sampler: the command goes on to find no checkpoint
  out = _run('sample', f'--workdir={tmp_path}', '--config.sampling.temperature=0.7')
  _one_line_error(out, r'checkpoint')


def test_a_config_that_is_no_file(tmp_path):
  for path, what in (('configs/digits/nonexist.py', 'no such file'),
                     ('configs/digits', 'a folder, not a config file')):
    _one_line_error(_run('train', f'--config={path}', f'--workdir={tmp_path / "w"}'),
                    f'--config {path}: {what}; a config is a Python file with get_config')
  assert not os.path.exists(tmp_path / 'w')


def test_counts_below_their_least_value_are_refused_before_any_work(tmp_path):
  workdir = tmp_path / 'run'
  _stored_config(str(workdir), 'digits/ddpmpp_continuous.py')
  for command, flag, pattern in (
      ('sample', '--num_samples=0', r'--num_samples must be >= 1; got 0'),
      ('sample', '--num_samples=-5', r'--num_samples must be >= 1; got -5'),
      ('sample', '--shard_size=-3', r'--shard_size must be >= 0 \(0: the default\); got -3'),
      ('bpd', '--num_repeats=0', r'--num_repeats must be >= 1'),
      ('bpd', '--max_examples=-3', r'--max_examples must be >= 0'),
      ('inpaint', '--num_images=-2', r'--num_images must be >= 0'),
      ('cond_sample', '--num_per_class=0', r'--num_per_class must be >= 1')):
    _one_line_error(_run(command, f'--workdir={workdir}', flag), pattern)
  assert sorted(os.listdir(workdir)) == ['config.json']
  config = os.path.join(ROOT, 'configs', 'digits', 'ddpmpp_continuous.py')
  for key, value in (('n_iters', -5), ('batch_size', 0)):
    _one_line_error(_run('train', f'--config={config}', f'--workdir={tmp_path / "t"}',
                         f'--config.training.{key}={value}'),
                    rf'config.training.{key} must be an integer >= 1; got {value}')


def test_a_score_model_given_as_the_classifier_workdir(tmp_path):
  _stored_config(str(tmp_path / 'score'), 'digits/ddpmpp_continuous.py')
  _one_line_error(_run('cond_sample', f'--workdir={tmp_path / "score"}',
                       f'--classifier_workdir={tmp_path / "score"}', '--labels=1'),
                  r"--classifier_workdir .* holds a 'ncsnpp' model, not a noise-conditional "
                  r"classifier")


def test_a_workdir_that_is_a_file_and_an_unknown_command(tmp_path):
  (tmp_path / 'run').write_text('')
  _one_line_error(_run('sample', f'--workdir={tmp_path / "run"}'),
                  r'--workdir .*run is a file; a workdir is a folder')
  out = _run('smaple', f'--workdir={tmp_path}')
  assert out.returncode != 0 and len(out.stderr.strip().splitlines()) <= 2, out.stderr
  assert "unknown command smaple; valid commands: ['bpd'" in out.stderr


def test_a_flag_with_no_value_at_the_end_of_the_line():
  """`--workdir` or `--config` as the last word: absl's one line, not an IndexError."""
  for flag in ('--workdir', '--config'):
    _one_line_error(_run('sample', flag), f'Missing value for flag {flag}')


def test_a_missing_images_or_classifier_flag_is_one_line_not_the_help(tmp_path):
  """inpaint / colorize without --images and cond_sample without --classifier_workdir:
  the error line alone, not the 130-line flag listing with it at the bottom."""
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  for command in ('inpaint', 'colorize'):
    _one_line_error(_run(command, f'--workdir={tmp_path}'), r'needs --images=')
  _one_line_error(_run('cond_sample', f'--workdir={tmp_path}'),
                  r'cond_sample needs --classifier_workdir=')


def test_eval_with_a_mistyped_tag_lists_the_sampling_jobs(tmp_path):
  """A --tag with no sampling job names the folders that have one (what --tag takes)."""
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  _one_line_error(_run('eval', f'--workdir={tmp_path}', '--tag=odee'),
                  r'no sampling job output in .*odee; .* has no sampling job yet: run '
                  r'launch.py sample')
  for tag in ('ode', 'step_200_pc_seed42_ab12'):
    os.makedirs(tmp_path / 'samples' / tag)
    (tmp_path / 'samples' / tag / 'manifest.json').write_text('{"num_shards": 1}')
  (tmp_path / 'samples' / 'step_100.png').write_bytes(b'')          # a snapshot grid: no job
  _one_line_error(_run('eval', f'--workdir={tmp_path}', '--tag=odee'),
                  r'the sampling jobs of .* \(--tag\): ode, step_200_pc_seed42_ab12; or leave '
                  r'--tag out for the newest finished one')


def test_another_sampling_method_for_inpaint_or_colorize_is_refused_not_ignored(tmp_path):
  """inpaint / colorize run the PC loop only: a method override would silently be PC."""
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  for command in ('inpaint', 'colorize'):
    _one_line_error(_run(command, f'--workdir={tmp_path}', '--images=test',
                         '--config.sampling.method=dpmpp_2m'),
                    rf'--config.sampling.method=dpmpp_2m: {command} runs the PC sampler only')
  # 'pc' itself passes the check: the command goes on to find no checkpoint
  _one_line_error(_run('inpaint', f'--workdir={tmp_path}', '--images=test',
                       '--config.sampling.method=pc'), r'checkpoint')


_INTERRUPTED = """
import sys
sys.argv = ['launch.py'] + sys.argv[1:]
import launch
from absl import app

def interrupted(argv):
  raise KeyboardInterrupt

launch.COMMANDS['sample'] = interrupted
app.run(launch.main, flags_parser=launch.parse_flags)
"""


def test_ctrl_c_says_how_to_resume(tmp_path):
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  out = _run('sample', f'--workdir={tmp_path}', code=_INTERRUPTED)
  assert out.returncode == 130, out
  assert out.stderr.strip().splitlines() == [
      'interrupted: what was written is intact (checkpoints, finished shards); run the same '
      'command again to resume.']


def test_a_tag_cannot_leave_the_workdir(tmp_path):
  workdir = tmp_path / 'run'
  _stored_config(str(workdir), 'digits/ddpmpp_continuous.py')
  for tag in ('../../escape', '/tmp/abs', '..', '.hidden'):
    _one_line_error(_run('sample', f'--workdir={workdir}', f'--tag={tag}'),
                    r'must be a plain folder name')
  assert sorted(os.listdir(tmp_path)) == ['run']
  assert sorted(os.listdir(workdir)) == ['config.json']


_FULL_DISK = """
import errno, os, sys
sys.argv = ['launch.py'] + sys.argv[1:]
import launch
from absl import app

def full(argv):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(launch.FLAGS.workdir, 'x'))

launch.COMMANDS['sample'] = full
app.run(launch.main, flags_parser=launch.parse_flags)
"""


def test_a_full_disk_names_the_place_and_the_intact_checkpoint(tmp_path):
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  for step in ('100', '200'):
    os.makedirs(tmp_path / 'checkpoints' / step)
  _one_line_error(_run('sample', f'--workdir={tmp_path}', code=_FULL_DISK),
                  r'no space left on device under .*; the last checkpoint, step 200, is intact; '
                  r'free some space')


_RECORDING = """
import json, sys
sys.argv = ['launch.py'] + sys.argv[1:]
import launch
from absl import app
from score_sde import jobs, train

def shown(value):      # a JSON stand-in: arrays by shape, dtype and values; configs by model

  if hasattr(value, 'shape'):
    return {'shape': list(value.shape), 'dtype': str(value.dtype),
            'values': value.ravel()[:4].tolist()}
  if hasattr(value, 'model'):
    return 'config ' + value.model.name
  return value

def recorder(name, result=None):
  def record(*args, **kwargs):
    call = {'name': name, 'args': [shown(a) for a in args],
            **{k: shown(v) for k, v in kwargs.items()}}
    print('CALL ' + json.dumps(call), flush=True)
    return {} if result is None else result
  return record

for name in ('inpaint_job', 'colorize_job', 'conditional_sample_job', 'stats_job'):
  setattr(jobs, name, recorder(name))
jobs.sample_job = recorder('sample_job', 'no/such/folder')    # the job's folder
jobs.bpd_job = recorder('bpd_job', {'bpd': 2.0, 'bpd_stderr': 0.01, 'num_examples': 40,
                                     'num_repeats': 3, 'split': 'train', 'tfds_split': 'train',
                                     'held_out': False, 'num_levels': 17, 'nfe_mean': 600.0,
                                     'checkpoint_step': 200, 'solver': {'solver': 'tsit5'},
                                     'result_file': 'eval/bpd.json'})
jobs.eval_job = recorder('eval_job', {'fid': 1.0, 'is': 9.0, 'is_std': 0.1, 'is_splits': 10,
                                       'num_samples': 50000})
train.train_and_evaluate = recorder('train')
app.run(launch.main, flags_parser=launch.parse_flags)
"""


def _library_calls(out, with_args=False):
  assert out.returncode == 0, out.stderr[-2000:]
  calls = [json.loads(line[len('CALL '):]) for line in out.stdout.splitlines()
           if line.startswith('CALL ')]
  return calls if with_args else [{k: v for k, v in c.items() if k != 'args'} for c in calls]


def test_job_and_train_flags_reach_the_library_call(tmp_path):
  """Each flag a command documents is passed to the library, not dropped on the way."""
  _stored_config(str(tmp_path), 'digits/ddpmpp_continuous.py')
  bpd = _run('bpd', f'--workdir={tmp_path}', '--split=train', '--num_repeats=3',
             '--batch_size=12', '--checkpoint=200', '--max_examples=40', code=_RECORDING)
  assert _library_calls(bpd) == [{'name': 'bpd_job', 'split': 'train', 'num_repeats': 3,
                                  'batch_size': 12, 'checkpoint': 200, 'max_examples': 40}]
  sample = _run('sample', f'--workdir={tmp_path}', '--num_samples=10', '--shard_size=5',
                '--checkpoint=100', '--seed=9', '--save_floats', '--tag=mine', code=_RECORDING)
  assert _library_calls(sample) == [{'name': 'sample_job', 'num_samples': 10, 'shard_size': 5,
                                     'checkpoint': 100, 'seed': 9, 'save_floats': True,
                                     'tag': 'mine'}]
  extended = _run('train', '--config=configs/digits/ddpmpp_continuous.py',
                  f'--workdir={tmp_path / "run"}', '--extend', code=_RECORDING)
  assert _library_calls(extended) == [{'name': 'train', 'extend': True}]


def test_the_other_commands_flags_reach_the_library_call(tmp_path):
  """inpaint, colorize, cond_sample, stats, eval and train_classifier pass each flag on,
  and --split means test for bpd but train for stats (what eval compares with)."""
  workdir, classifier = str(tmp_path / 'model'), str(tmp_path / 'classifier')
  _stored_config(workdir, 'digits/ddpmpp_continuous.py')
  _stored_config(classifier, 'digits/wrn_classifier.py')
  images = tmp_path / 'images.npy'
  np.save(images, np.linspace(0, 1, 3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8, 1))
  image_array = {'shape': [2, 8, 8, 1], 'dtype': 'float32',
                 'values': np.linspace(0, 1, 3 * 64, dtype=np.float32)[:4].tolist()}
  inpaint = _run('inpaint', f'--workdir={workdir}', f'--images={images}', '--num_images=2',
                 '--mask=left_half', '--mask_fraction=0.3', f'--out_dir={tmp_path / "o1"}',
                 '--samples_per_image=2', '--seed=5', '--checkpoint=300', code=_RECORDING)
  assert _library_calls(inpaint, with_args=True) == [{
      'name': 'inpaint_job', 'args': [workdir, 'config ncsnpp', image_array, 'left_half'],
      'mask_fraction': 0.3, 'out_dir': str(tmp_path / 'o1'), 'samples_per_image': 2,
      'seed': 5, 'checkpoint': 300}]
  colorize = _run('colorize', f'--workdir={workdir}', f'--images={images}', '--num_images=2',
                  f'--out_dir={tmp_path / "o2"}', '--samples_per_image=3', '--seed=6',
                  '--checkpoint=400', code=_RECORDING)
  assert _library_calls(colorize, with_args=True) == [{
      'name': 'colorize_job', 'args': [workdir, 'config ncsnpp', image_array],
      'out_dir': str(tmp_path / 'o2'), 'samples_per_image': 3, 'seed': 6, 'checkpoint': 400}]
  conditional = _run('cond_sample', f'--workdir={workdir}', f'--classifier_workdir={classifier}',
                     '--labels=3,1,4', '--scale=2.5', f'--out_dir={tmp_path / "o3"}',
                     '--seed=7', '--checkpoint=500', code=_RECORDING)
  [call] = _library_calls(conditional, with_args=True)
  assert call['args'][:4] == [workdir, 'config ncsnpp', classifier, 'config wideresnet']
  assert call['args'][4]['shape'] == [3] and call['args'][4]['values'] == [3, 1, 4]
  assert {k: v for k, v in call.items() if k != 'args'} == {
      'name': 'conditional_sample_job', 'scale': 2.5, 'out_dir': str(tmp_path / 'o3'),
      'seed': 7, 'checkpoint': 500}
  every_class = _run('cond_sample', f'--workdir={workdir}',
                     f'--classifier_workdir={classifier}', '--num_per_class=2', code=_RECORDING)
  labels = _library_calls(every_class, with_args=True)[0]['args'][4]
  assert labels['shape'] == [20] and labels['values'] == [0, 0, 1, 1]
  config = 'configs/digits/ddpmpp_continuous.py'
  for extra, split in (([], 'train'), (['--split=test'], 'test')):
    stats = _run('stats', f'--config={config}', f'--stats_file={tmp_path / "s.npz"}',
                 f'--inception_weights={tmp_path / "w.npz"}', '--max_examples=70', *extra,
                 code=_RECORDING)
    assert _library_calls(stats) == [{'name': 'stats_job', 'split': split,
                                      'out_path': str(tmp_path / 's.npz'),
                                      'weights': str(tmp_path / 'w.npz'), 'max_examples': 70}]
  assert _library_calls(_run('bpd', f'--workdir={workdir}', code=_RECORDING))[0]['split'] == 'test'
  evaluated = _run('eval', f'--workdir={workdir}', '--tag=mine',
                   f'--stats_file={tmp_path / "s.npz"}', f'--inception_weights={tmp_path / "w.npz"}',
                   code=_RECORDING)
  assert _library_calls(evaluated) == [{'name': 'eval_job', 'tag': 'mine',
                                        'stats_path': str(tmp_path / 's.npz'),
                                        'weights': str(tmp_path / 'w.npz')}]
  assert 'FID 1.00' in evaluated.stdout
  trained = _run('train_classifier', '--config=configs/digits/wrn_classifier.py',
                 f'--workdir={tmp_path / "c2"}', '--extend', code=_RECORDING)
  assert _library_calls(trained, with_args=True) == [{
      'name': 'train', 'args': ['config wideresnet', str(tmp_path / 'c2')], 'extend': True}]


def test_the_eval_summary_states_kid_units_and_warns_about_few_samples():
  out = _run(code='import sys; sys.argv = ["launch.py"]; import launch; print(launch._quality_summary('
                  '{"fid": 12.5, "kid": 0.0042, "kid_stderr": 0.0003, "is": 7.5, "is_std": 0.2, '
                  '"is_splits": 10, "num_samples": 64}))')
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert 'KID 4.20 +- 0.30 (x 1e-3' in text and 'FID 12.50' in text and 'on 64 samples' in text
  assert 'note: FID on 64 samples is biased upwards' in text
  assert 'IS is biased downwards on few samples per split (10 split(s) here' in text
  digits = _run(code='import sys; sys.argv = ["launch.py"]; import launch; print(launch.'
                     '_quality_summary({"digits_fid": 87.0, "digits_kid": 529.0, '
                     '"digits_kid_stderr": 104.7, "digits_is": 7.55, "digits_is_std": 0.46, '
                     '"num_samples": 297}))')
  assert 'digits_KID 529.00 +- 104.70 (classifier features)' in digits.stdout, digits.stdout
  assert 'x 1e-3' not in digits.stdout
  # the project's own metric: compared run to run, with no paper's sample count to name
  assert ('note: digits_FID is biased upwards on few samples (it falls as the sample count '
          'grows): compare only digits_FIDs computed on as many samples (297 here)'
          in digits.stdout), digits.stdout
  assert 'papers' not in digits.stdout and 'Salimans' not in digits.stdout


def test_the_eval_summary_says_what_each_plus_minus_is():
  """KID's +- is a standard error (metrics.kernel_inception_distance), IS's the standard
  deviation over splits (metrics.inception_score): the line says which, with the split count."""
  out = _run(code='import sys; sys.argv = ["launch.py"]; import launch; print(launch._quality_summary('
                  '{"fid": 3.1, "kid": 0.0012, "kid_stderr": 0.0001, "is": 9.8, "is_std": 0.1, '
                  '"is_splits": 10, "num_samples": 50000}))')
  assert out.returncode == 0, out.stderr
  assert "KID's +- is its standard error" in out.stdout, out.stdout
  assert "IS's +- is the standard deviation of the score over its 10 split(s)" in out.stdout
  assert 'note:' not in out.stdout                       # 50,000 samples: no small-sample note
  no_kid = _run(code='import sys; sys.argv = ["launch.py"]; import launch; print(launch.'
                     '_quality_summary({"fid": 3.1, "kid": None, "is": 9.8, "is_std": 0.1, '
                     '"is_splits": 10, "num_samples": 50000}))')
  assert "KID's" not in no_kid.stdout and "IS's +- is the standard deviation" in no_kid.stdout


def test_the_bpd_command_ends_with_one_readable_line():
  """After the JSON: the final evaluation's line (bits/dim +- standard error, on what, how:
  the ODE with its mean NFE, or a flow's exact change of variables), the repeats, the step
  and the result file."""
  code = ('import sys; sys.argv = ["launch.py"]; import launch; print(launch._bpd_summary('
          '{"bpd": 2.00431, "bpd_stderr": 0.01512, "num_examples": 297, "num_repeats": 5, '
          '"split": "test", "tfds_split": "test", "held_out": True, "num_levels": 17, '
          '"nfe_mean": 640.2, "checkpoint_step": 1700, "solver": {"solver": "tsit5"}, '
          '"result_file": "w/eval/bpd_test_1700_ab_r5.json"}))')
  out = _run(code=code)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == (
      'Test bits/dim (probability-flow ODE, 17 levels, 297 examples): 2.0043 +- 0.0151 '
      '(standard error) (mean NFE 640); 5 repeat(s), step 1700 -> '
      'w/eval/bpd_test_1700_ab_r5.json')
  flow = _run(code=code.replace('"solver": {"solver": "tsit5"}',
                                '"solver": {"method": "change_of_variables"}')
              .replace('"held_out": True', '"held_out": False')
              .replace('"tfds_split": "test"', '"tfds_split": "train[:1500]"'))
  assert flow.stdout.startswith('Training-data (tfds train[:1500]) bits/dim (exact change of '
                                'variables, 17 levels, 297 examples): 2.0043 +- 0.0151 '
                                '(standard error); 5 repeat(s)'), flow.stdout


def test_the_sample_command_says_how_many_score_evaluations_each_sample_took():
  """The few-step samplers are chosen by NFE: the last line states it (the shards' mean: an
  adaptive ODE's varies), 'one inverse pass' for a flow, nothing without a manifest."""
  code = ('import sys; sys.argv = ["launch.py"]; import launch; print(repr(launch._sampling_cost('
          '{"num_samples": 297, "sampler": {"method": "%s"}, '
          '"shards": {"0": {"nfe": 10}, "1": {"nfe": %d}}})))')
  out = _run(code=code % ('dpmpp_2m', 10))
  assert out.stdout.strip() == "'297 samples, 10 score evaluations each; '", out.stderr
  assert "297 samples, 134 score evaluations each; " in _run(code=code % ('ode', 258)).stdout
  assert "297 samples, one inverse pass each; " in _run(code=code % ('flow', 1)).stdout
  none = _run(code='import sys; sys.argv = ["launch.py"]; import launch; '
                   'print(repr(launch._sampling_cost(None)))')
  assert none.stdout.strip() == "''"
