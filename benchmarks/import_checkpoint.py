"""Import time and peak memory of `import_checkpoint` for a full-size paper config;
prints one JSON object.

  python benchmarks/import_checkpoint.py --config configs/ve/cifar10_ncsnpp_deep_continuous.py

The source file is made here (tests/original_writers.py): random parameters of the
config's network written as yang-song/score_sde's msgpack State (parameters,
Adam moments, EMA), the layout of the released Flax checkpoints. The import runs in a fresh
subprocess, so its peak resident memory (ru_maxrss) is the import's alone.
Reported: parameter count, source file size, import wall time, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

_CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import configs
from score_sde.jobs import import_checkpoint
config = configs.load(sys.argv[1])
start = time.perf_counter()
summary = import_checkpoint.import_checkpoint(sys.argv[2], config, sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({'import_s': round(seconds, 2), 'parameters': summary['parameters'],
                  'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/ve/cifar10_ncsnpp_deep_continuous.py')
  args = parser.parse_args()
  import configs
  from tests import original_writers
  config = configs.load(str(REPO / args.config))
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, 'checkpoint_26')
    start = time.perf_counter()
    original_writers.write_flax(config, source, step=1300000)
    write_s = time.perf_counter() - start
    run = subprocess.run([sys.executable, '-c', _CHILD, str(REPO / args.config), source,
                          os.path.join(tmp, 'workdir'), str(REPO)],
                         capture_output=True, text=True, check=False)
    if run.returncode:
      sys.exit(run.stderr[-3000:])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({'config': args.config, 'format': 'flax',
                      'source_mb': round(os.path.getsize(source) / 2**20, 1),
                      'write_source_s': round(write_s, 2), **result,
                      'machine': platform.machine(), 'cpus': os.cpu_count()}))


if __name__ == '__main__':
  main()
