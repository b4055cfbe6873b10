"""The README's stand-alone Python example runs as written (the examples on a trained
workdir run in test_jobs.py and test_flow_training.py, on those files' workdirs)."""
import numpy as np

from tests.readme_examples import python_blocks, run_example


def test_the_sde_interface_example_runs_and_gives_the_closed_form():
  (block,) = python_blocks('The SDE interface')
  names = run_example(block, {})
  sde, x0 = names['sde'], names['x0']
  assert x0.shape == (128, 2)
  beta_integral = 0.5 * 0.5 ** 2 * (20 - 0.1) + 0.5 * 0.1      # int_0^0.5 beta(s) ds
  np.testing.assert_allclose(names['mean'], x0 * np.exp(-0.5 * beta_integral), rtol=1e-5)
  np.testing.assert_allclose(names['std'], np.sqrt(1 - np.exp(-beta_integral)), rtol=1e-5)
  # probability flow: f - g^2 / 2 * score, with f = -beta / 2 x and g^2 = beta
  beta = 0.1 + 0.5 * (20 - 0.1)
  score = names['score_fn'](x0, 0.5)
  np.testing.assert_allclose(names['drift'], -0.5 * beta * x0 - 0.5 * beta * score,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(names['diffusion'], 0.0)
  assert sde.N == 1000
