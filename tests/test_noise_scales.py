"""NCSNv2 noise-scale selection: the gamma equation, sigma_max, scale count, step size."""
import itertools
import math

import numpy as np
import pytest
import scipy.stats

from score_sde import noise_scales


@pytest.mark.parametrize('dim', [5, 64, 3072, 12288, 196608])
def test_gamma_solves_its_equation(dim):
  gamma = noise_scales.geometric_ratio(dim)
  c = math.sqrt(2 * dim) * (gamma - 1)
  value = scipy.stats.norm.cdf(c + 3 * gamma) - scipy.stats.norm.cdf(c - 3 * gamma)
  assert gamma > 1 and abs(value - 0.5) < 1e-6


def test_gamma_decreases_with_dimension():
  gammas = [noise_scales.geometric_ratio(d) for d in [16, 256, 4096, 65536]]
  assert all(a > b for a, b in zip(gammas, gammas[1:]))


def test_exact_diameter_of_known_point_sets():
  cube = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
  d = noise_scales.data_diameter(cube)
  assert d.exact and d.estimate == pytest.approx(math.sqrt(3), rel=1e-12)
  rng = np.random.default_rng(0)
  cloud = rng.normal(size=(3000, 2, 2, 3))           # image-shaped data are flattened
  cloud[17] = 40.0
  cloud[2001] = -40.0
  expected = np.linalg.norm(cloud[17] - cloud[2001])
  assert noise_scales.data_diameter(cloud, block_size=256).estimate == pytest.approx(expected)


def test_exact_diameter_is_independent_of_the_block_size():
  """Every block of rows is compared with all points: the farthest pair is found
  wherever the blocks cut (brute-force pairwise distances as the reference)."""
  rng = np.random.default_rng(3)
  points = rng.normal(size=(7, 4))
  for shift in range(7):
    rolled = np.roll(points, shift, axis=0)
    expected = np.max(np.linalg.norm(rolled[:, None] - rolled[None], axis=-1))
    for block_size in range(1, 9):
      d = noise_scales.data_diameter(rolled, exact=True, block_size=block_size)
      assert d.estimate == pytest.approx(expected, rel=1e-12), (shift, block_size)


def test_approximate_diameter_brackets_the_truth():
  rng = np.random.default_rng(1)
  points = rng.uniform(-1, 1, size=(2500, 8)) * np.linspace(1, 3, 8)
  exact = noise_scales.data_diameter(points, exact=True).estimate
  approx = noise_scales.data_diameter(points, exact=False)
  assert not approx.exact
  assert approx.lower <= exact + 1e-9 <= approx.upper + 2e-9
  assert approx.lower == approx.estimate and approx.estimate > 0.9 * exact


def test_num_scales_reaches_sigma_min_exactly_once():
  for sigma_max, dim in [(50.0, 3072), (1.3, 64), (378.0, 196608)]:
    gamma = noise_scales.geometric_ratio(dim)
    n = noise_scales.num_scales(sigma_max, 0.01, gamma)
    assert sigma_max / gamma ** (n - 1) <= 0.01 * (1 + 1e-9)
    assert sigma_max / gamma ** (n - 2) > 0.01


@pytest.mark.parametrize('sigma_max, num, steps, published', [
    (50.0, 232, 5, 6.2e-6),     # NCSNv2 CIFAR-10 config
    (90.0, 500, 5, 3.3e-6),     # NCSNv2 CelebA 64x64 config
    (190.0, 1086, 3, 1.8e-6),   # NCSNv2 LSUN bedroom config
])
def test_step_size_matches_published_ncsnv2_configs(sigma_max, num, steps, published):
  gamma = (sigma_max / 0.01) ** (1 / (num - 1))
  step = noise_scales.langevin_step_size(0.01, gamma, steps)
  assert step == pytest.approx(published, rel=0.04)

  def distance_from_one(eps):
    a = eps / 0.01 ** 2
    return abs((1 - a) ** (2 * steps) * (gamma ** 2 - 2 / (2 - a)) + 2 / (2 - a) - 1)

  # A minimum of |variance ratio - 1| (the ratio need not reach 1 exactly).
  assert distance_from_one(step) < min(distance_from_one(step * 0.99),
                                       distance_from_one(step * 1.01))


def test_select_noise_scales_end_to_end():
  rng = np.random.default_rng(2)
  data = rng.uniform(0, 1, size=(500, 4, 4, 1))
  scales = noise_scales.select_noise_scales(data, sigma_min=0.01, n_steps_each=3)
  assert scales.dim == 16
  assert scales.sigma_max == pytest.approx(noise_scales.data_diameter(data).estimate)
  assert scales.num_scales == noise_scales.num_scales(scales.sigma_max, 0.01, scales.gamma)
  lines = scales.config_lines()
  assert f'model.num_scales = {scales.num_scales}' in lines
  assert 'model.sigma_max = ' in lines
  # ALD takes steps 2 (snr sigma_i)^2 = eps sigma_i^2 / sigma_min^2.
  assert 2 * (scales.ald_snr * 0.01) ** 2 == pytest.approx(scales.step_lr)


def test_ald_snr_of_published_ncsnv2_cifar10_step():
  scales = noise_scales.NoiseScales(50.0, 0.01, 1.0376, 232, 6.2e-6, 5, None, 3072)
  assert scales.ald_snr == pytest.approx(0.176, abs=1e-3)   # the reference config's snr


@pytest.mark.parametrize('call, message', [
    (lambda: noise_scales.geometric_ratio(0), 'positive integer'),
    (lambda: noise_scales.geometric_ratio(4), 'no solution for data dimension 4'),
    (lambda: noise_scales.num_scales(0.01, 1.0, 1.1), 'sigma_min < sigma_max'),
    (lambda: noise_scales.data_diameter(np.zeros((1, 3))), 'at least two'),
    (lambda: noise_scales.langevin_step_size(0.01, 1.05, 0), 'steps per scale'),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()
