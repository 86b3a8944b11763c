"""ArcFace: an ensemble of K = 3 trained together, no diversity term ("Baseline").

  python -m faceens.train --config=experiments/arcface_baseline.py:demo --workdir=runs/arcface_baseline

2 CPU cores: demo about 4 min, lfw about 10 min. Variants and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "baseline"        # loss: sum_k CE_k, each member with its own class weights
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  return c
