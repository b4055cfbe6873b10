"""Jobs over a trained workdir, all on one resumable, sharded skeleton (`common.py`).

  sample.py        samples into npz shards, a manifest and a grid (and training snapshots)
  bpd.py           bits/dim of a split through the probability-flow ODE
  quality.py       FID / KID / IS of a sampling job, dataset statistics, the main
                   job's final evaluation
  controllable.py  inpainting, colourisation, class-conditional sampling
  classifier.py    a noise-conditional classifier's accuracy by noise level

The jobs import the experiment layer below them (`score_sde.experiment`), never
the training loop; `train.py` imports them for its final evaluation.
"""
from score_sde.jobs.bpd import LikelihoodSettings, baselines, bpd_job
from score_sde.jobs.classifier import evaluate_classifier
from score_sde.jobs.controllable import colorize_job, conditional_sample_job, inpaint_job
from score_sde.jobs.quality import eval_job, final_evaluation, stats_job
from score_sde.jobs.sample import load_samples, sample_job

__all__ = ['LikelihoodSettings', 'baselines', 'bpd_job', 'evaluate_classifier', 'colorize_job',
           'conditional_sample_job', 'inpaint_job', 'eval_job', 'final_evaluation', 'stats_job',
           'load_samples', 'sample_job']
