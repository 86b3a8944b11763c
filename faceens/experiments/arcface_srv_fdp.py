"""ArcFace: SRV + FDP, gamma = 10: the paper's method.

  python -m faceens.train --config=experiments/arcface_srv_fdp.py:demo --workdir=runs/arcface_srv_fdp

Paper grid: --config.fdp.gamma=1 or 50. 2 CPU cores: demo about 4 min, lfw about 10 min. Variants
and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "srv_fdp"         # SRV (one shared W) + FDP on the member features
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  c.fdp = configs.group(gamma=10.0)  # best of the paper's grid 1, 10, 50
  return c
