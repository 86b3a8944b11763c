"""CosFace: ensemble + ADP: arcface_adp.py's settings, CosFace head (m = 0.35).

  python -m faceens.train --config=experiments/cosface_adp.py:demo --workdir=runs/cosface_adp
  python -m faceens.train --config=experiments/cosface_adp.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/cosface_adp.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.adp.beta=10 or 50.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_adp", variant)
  return configs.set_loss(c, "cosface")  # s = 64, m = 0.35 (Wang et al. 2018)
