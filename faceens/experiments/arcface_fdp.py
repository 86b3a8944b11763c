"""ArcFace: ensemble + FDP, gamma = 10 (the paper's feature diversity, Eq. 6).

  python -m faceens.train --config=experiments/arcface_fdp.py:demo --workdir=runs/arcface_fdp

Paper grid: --config.fdp.gamma=1 or 50. 2 CPU cores: demo about 4 min, lfw about 10 min. Variants
and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "fdp"             # loss: sum_k CE_k - gamma * log det of the member features' Gram
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  c.fdp = configs.group(gamma=10.0)  # best of the paper's grid 1, 10, 50
  return c
