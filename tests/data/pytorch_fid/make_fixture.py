"""Writes expected.npz and layout.json of this folder with pytorch-fid's own network.

Run with a Python that has torch, torchvision, numpy and pytorch-fid (no score_sde,
no JAX, no download):

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch pytorch-fid
  /tmp/torchvenv/bin/python tests/data/pytorch_fid/make_fixture.py

pytorch-fid's FID Inception (`pytorch_fid.inception.InceptionV3`, the network behind its
FID numbers) is built with random weights instead of the released ones (its loader is
handed these instead of downloading): every floating-point entry of the state dict, in
state-dict order, is drawn from numpy's legacy RandomState(0) stream, which numpy keeps
bit-stable across versions, by weights.py (numpy only), so tests/test_inception.py
rebuilds the same weights from layout.json without torch:

  conv weights        normal * sqrt(2 / fan_in)          (He scale: activations stay O(1))
  batch-norm weight   uniform(0.8, 1.2)   bias, running_mean  uniform(-0.1, 0.1)
  running_var         uniform(0.8, 1.2)
  fc.weight           normal * sqrt(1 / 2048)            fc.bias  uniform(-0.1, 0.1)

expected.npz:
  images        uint8 [2, 139, 139, 3] RandomState(1) pixels (NHWC); 139 is the smallest
                                       size whose last blocks work on 3 x 3 maps, so
                                       their 3 x 3 pools see borders and interior
  pool3         float32 [2, 2048]      InceptionV3(output_blocks=[3], resize_input=False)
                                       on images / 255 (it maps them to [-1, 1] itself)
  logits        float32 [2, 1008]      pytorch-fid's fc layer on pool3 (the wrapper drops
                                       fc; it is the Inception's own nn.Linear here)
  small         uint8 [2, 32, 32, 3]   RandomState(2) pixels
  resized_75    float32 [2, 75, 75, 3] F.interpolate(small / 255, (75, 75), 'bilinear',
                                       align_corners=False), pytorch-fid's resize, in NHWC
layout.json: [[state-dict name, shape], ...] of the full FID Inception, in order, and the
versions of torch, torchvision and pytorch-fid that wrote the files.
"""
import json
import os
import sys
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as fid_inception

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 139
sys.path.insert(0, HERE)
import weights  # noqa: E402  (beside this script; numpy only)


def layout() -> list:
  """[(name, shape)] of the FID Inception's state dict (built without loading weights)."""
  with mock.patch.object(fid_inception, 'load_state_dict_from_url', lambda *a, **k: {}), \
       mock.patch.object(torch.nn.Module, 'load_state_dict', lambda *a, **k: None):
    model = fid_inception.fid_inception_v3()
  return [(name, list(value.shape)) for name, value in model.state_dict().items()]


def random_state_dict(entries) -> dict:
  """The weights of the module docstring (weights.random_arrays) as torch tensors."""
  arrays = weights.random_arrays(entries)
  return {name: (torch.from_numpy(arrays[name]) if name in arrays
                 else torch.zeros((), dtype=torch.long))       # num_batches_tracked
          for name, _ in entries}


def main() -> None:
  torch.set_num_threads(1)
  entries = layout()
  state = random_state_dict(entries)
  with mock.patch.object(fid_inception, 'load_state_dict_from_url', lambda *a, **k: state):
    network = fid_inception.InceptionV3([3], resize_input=False, normalize_input=True).eval()
  images = np.random.RandomState(1).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  small = np.random.RandomState(2).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  with torch.no_grad():
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pool3 = network(nchw)[0][:, :, 0, 0]
    logits = pool3 @ state['fc.weight'].T + state['fc.bias']
    resized = F.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0,
                            size=(75, 75), mode='bilinear', align_corners=False)
  np.savez(os.path.join(HERE, 'expected.npz'), images=images, pool3=pool3.numpy(),
           logits=logits.numpy(), small=small,
           resized_75=resized.permute(0, 2, 3, 1).numpy())
  from importlib import metadata
  with open(os.path.join(HERE, 'layout.json'), 'w') as f:
    json.dump({'state_dict': entries, 'torch': torch.__version__,
               'torchvision': torchvision.__version__,
               'pytorch_fid': metadata.version('pytorch-fid'),
               'numpy': np.__version__}, f, indent=0)
  print(f'pool3 |max| {float(pool3.abs().max()):.3g}, logits |max| '
        f'{float(logits.abs().max()):.3g}', file=sys.stderr)


if __name__ == '__main__':
  main()
