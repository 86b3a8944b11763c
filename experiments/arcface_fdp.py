"""ArcFace: ensemble + FDP, gamma = 10 (the paper's feature diversity, Eq. 6).

  python -m faceens.train --config=experiments/arcface_fdp.py:demo --workdir=runs/arcface_fdp
  python -m faceens.train --config=experiments/arcface_fdp.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_fdp.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.fdp.gamma=1 or 50.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "fdp"             # loss: sum_k CE_k - gamma * log det of the member features' Gram
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  c.fdp = configs.group(gamma=10.0)  # best of the paper's grid 1, 10, 50
  return c
