"""ArcFace: a single MobileFaceNet (K = 1), the reference every ensemble is compared to.

  python -m faceens.train --config=experiments/arcface_single.py:demo --workdir=runs/arcface_single
  python -m faceens.train --config=experiments/arcface_single.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_single.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 3 min, lfw about 6 min (5.6 measured);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "single"
  c.ensemble.num_members = 1   # one network, its own class weights, plain ArcFace loss
  return c
