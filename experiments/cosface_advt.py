"""CosFace: a single model with MTER adversarial training:
arcface_advt.py's settings, CosFace head (m = 0.35).

  python -m faceens.train --config=experiments/cosface_advt.py:demo --workdir=runs/cosface_advt
  python -m faceens.train --config=experiments/cosface_advt.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/cosface_advt.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 8 min, lfw about 35 min with 3 MTER
steps (34.6 measured, sharing the cores);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.advt.margin=0.2, 1.4 or 3.0.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_advt", variant)
  return configs.set_loss(c, "cosface")  # s = 64, m = 0.35 (Wang et al. 2018)
