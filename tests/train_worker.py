"""Runs `train_and_evaluate` in its own process (multi-process and kill/resume tests).

python tests/train_worker.py <workdir> <n_iters> [<coordinator> <num_processes> <process_id>]

Devices per process come from XLA_FLAGS (set by the test). With a coordinator,
the processes form one JAX cluster over gloo CPU collectives.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_worker(workdir, n_iters: int, devices: int = 1, extra=(), env=None):
  """This script in a subprocess on `devices` CPU devices (stdout and stderr piped
  together); `env` adds variables (SCORE_SDE_TEST_MODEL_DTYPE, SCORE_SDE_TEST_FLOW)."""
  import subprocess
  full_env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
              'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT, **(env or {})}
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir),
                           str(n_iters), *extra], env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def small_toy_config(n_iters: int):
  from configs.toy import vp_mlp_continuous
  config = vp_mlp_continuous.get_config()
  config.training.batch_size = 16
  config.training.n_iters = n_iters
  config.training.log_freq = 1
  config.training.eval_freq = 0
  config.training.snapshot_freq = 50
  config.training.snapshot_freq_for_preemption = 10
  config.model.nf = 32
  config.model.num_layers = 2
  config.eval.enable_bpd = False
  return config


def small_flow_config(name: str, n_iters: int = 200):
  """A digits flow ('nice', 'realnvp' or 'glow') small enough to train 200 steps in seconds."""
  import importlib
  config = importlib.import_module(f'configs.digits.{name}').get_config()
  model, training = config.model, config.training
  if name == 'nice':
    model.hidden_features, model.hidden_layers = 32, 2
    # With its dropout (0.3) this small NICE is still above the uniform baseline after
    # 200 steps; realnvp and glow keep theirs, so dropout runs through the loop there.
    model.dropout = 0.0
  elif name == 'realnvp':
    model.hidden_features, model.num_res_blocks = 8, 1
  else:
    model.num_steps, model.hidden_features = 2, 16
  training.batch_size = 32
  training.n_iters = n_iters
  training.log_freq = 10
  training.eval_freq = 0
  training.snapshot_freq = 0
  training.snapshot_freq_for_preemption = 100
  training.snapshot_sampling = False
  config.eval.batch_size = 32
  config.eval.num_samples = 32
  return config


def main(argv):
  workdir, n_iters = argv[1], int(argv[2])
  if len(argv) > 3:
    from score_sde import parallel
    parallel.initialize_distributed(argv[3], int(argv[4]), int(argv[5]), cpu_collectives='gloo')
  from score_sde import train
  flow = os.environ.get('SCORE_SDE_TEST_FLOW')        # e.g. 'glow': a digits flow instead
  if flow:
    config = small_flow_config(flow, n_iters)
    config.eval.enable_bpd = False
  else:
    config = small_toy_config(n_iters)
    config.model.dtype = os.environ.get('SCORE_SDE_TEST_MODEL_DTYPE', 'float32')
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  main(sys.argv)
