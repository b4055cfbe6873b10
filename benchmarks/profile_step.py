"""Where a train step's time goes: XLA ops grouped by kind, from a jax.profiler trace.

  python benchmarks/profile_step.py --config configs/ve/cifar10_ncsnpp_continuous.py \
      --batch 8 --override model.nf=32 --top 15

Compiles exactly the step benchmarks/train.py measures (the launcher's form,
`train.param_layout`: flat on the CPU backend; `--param_layout tree` for the
parameter-tree form, reported as `param_layout`), runs it --steps times
under jax.profiler, and prints JSON: the step's wall time, the time each XLA
worker thread spent in each kind of op per step (convolution forward / input
gradient / weight gradient, dot, layout transposes, elementwise fusions by
phase, the RNG's while loops, ...) and the --top single ops with their
source (`op_name` metadata). Convolutions that XLA hands to Eigen's thread
pool record only their dispatch in the trace; their work shows up as
`unattributed_thread_ms` (thread time of the step minus all recorded ops).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_INSTRUCTION = re.compile(r'\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*)')


def parse_hlo(text: str):
  """{instruction name: (shape, opcode, called computation, op_name)}, {computation: body}."""
  from score_sde.cpu import xla_flags as xla_cpu
  bodies = xla_cpu.hlo_computations(text)
  instructions = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, shape, opcode, rest = match.groups()
      calls = re.search(r'calls=%([^,\s]+)', rest)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      instructions[name] = (shape, opcode, calls.group(1) if calls else None,
                            op_name.group(1) if op_name else '')
  return instructions, bodies


def op_kind(name: str, instructions, bodies, batch: int) -> str:
  """A readable kind for one executed op (a thunk named after its HLO instruction).

  A convolution whose result does not lead with the (per-device) batch is a
  weight gradient: forward and input-gradient results are [batch, H, W, C].
  """
  if name not in instructions:
    return 'runtime'
  shape, opcode, calls, op_name = instructions[name]
  body = '\n'.join(bodies.get(calls, [])) if calls else ''
  phase = ('backward' if 'transpose(jvp' in op_name else
           'forward' if 'jvp(' in op_name else 'optimizer/other')
  if opcode == 'convolution' or ' convolution(' in body:
    if not re.match(rf'\w+\[{batch},', shape):
      return 'convolution weight gradient'
    return 'convolution input gradient' if phase == 'backward' else 'convolution forward'
  if opcode == 'dot' or ' dot(' in body:
    return f'dot ({phase})'
  if opcode == 'while' or '/while' in op_name:
    return 'while loops (threefry RNG)'
  if ' transpose(' in body or opcode == 'transpose':
    return 'layout transposes'
  if opcode == 'copy':
    return 'copies'
  return f'elementwise/reduce fusions ({phase})'


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=10)
  parser.add_argument('--override', action='append', default=[])
  parser.add_argument('--param_layout', choices=('auto', 'tree', 'flat'), default=None,
                      help="the train step's form (training.param_layout); default: the config's")
  args = parser.parse_args()

  sys.path.insert(0, ROOT)
  import jax
  from train import build_train_step   # benchmarks/train.py

  compiled, state, x, mesh, _, _, layout = build_train_step(
      args.config, args.batch, args.override, param_layout=args.param_layout)
  batch_per_device = args.batch // mesh.devices.size
  instructions, bodies = parse_hlo(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, x)
  jax.block_until_ready(metrics)

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = compiled(state, x)
        jax.block_until_ready(metrics)
      wall = (time.perf_counter() - start) / args.steps
    trace_file = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(trace_file)

  by_kind, by_op, threads = collections.Counter(), collections.Counter(), 0
  for plane in profile.planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:          # XLA's worker threads
        continue
      threads += 1
      for event in line.events:
        if event.name.startswith(('ThunkExecutor', 'ThreadpoolListener', 'end:')):
          continue
        ms = event.duration_ns / 1e6 / args.steps
        by_kind[op_kind(event.name, instructions, bodies, batch_per_device)] += ms
        by_op[event.name] += ms
  attributed = sum(by_kind.values())
  top = []
  for name, ms in by_op.most_common(args.top):
    shape, _, _, op_name = instructions.get(name, ('', '', None, ''))
    top.append({'op': name, 'thread_ms_per_step': round(ms, 2), 'shape': shape,
                'source': op_name.split('/', 1)[-1]})
  print(json.dumps({
      'config': os.path.relpath(os.path.abspath(args.config), ROOT),
      'overrides': args.override, 'batch': args.batch, 'param_layout': layout,
      'step_s_profiled': round(wall, 4), 'worker_threads': threads,
      'unattributed_thread_ms': round(threads * wall * 1e3 - attributed, 1),
      'thread_ms_per_step_by_kind': {k: round(v, 1) for k, v in by_kind.most_common()},
      'top_ops': top,
  }, indent=1))


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  from score_sde.cpu import process
  process.prepare()   # XLA:CPU flags and the huge-page restart, as launch.py (score_sde/cpu/)
  main()
