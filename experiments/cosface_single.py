"""CosFace: a single MobileFaceNet (K = 1): arcface_single.py's settings, CosFace head (m = 0.35).

  python -m faceens.train --config=experiments/cosface_single.py:demo --workdir=runs/cosface_single
  python -m faceens.train --config=experiments/cosface_single.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/cosface_single.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 3 min, lfw about 6 min (5.6 measured);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_single", variant)
  return configs.set_loss(c, "cosface")  # s = 64, m = 0.35 (Wang et al. 2018)
