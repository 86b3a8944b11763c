"""ArcFace: ensemble with SRV, one class-weight matrix shared by the K = 3 members.

  python -m faceens.train --config=experiments/arcface_srv.py:demo --workdir=runs/arcface_srv

2 CPU cores: demo about 4 min, lfw about 10 min. Variants and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "srv"             # SRV: every member's features scored against the same W
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  return c
