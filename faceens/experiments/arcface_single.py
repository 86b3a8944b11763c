"""ArcFace: a single MobileFaceNet (K = 1), the reference every ensemble is compared to.

  python -m faceens.train --config=experiments/arcface_single.py:demo --workdir=runs/arcface_single

2 CPU cores: demo about 3 min, lfw about 3 min. Variants and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "single"
  c.ensemble.num_members = 1   # one network, its own class weights, plain ArcFace loss
  return c
