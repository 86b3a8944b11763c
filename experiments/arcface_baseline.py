"""ArcFace: an ensemble of K = 3 trained together, no diversity term ("Baseline").

  python -m faceens.train --config=experiments/arcface_baseline.py:demo --workdir=runs/arcface_baseline
  python -m faceens.train --config=experiments/arcface_baseline.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_baseline.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "baseline"        # loss: sum_k CE_k, each member with its own class weights
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  return c
