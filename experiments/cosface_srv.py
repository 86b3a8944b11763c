"""CosFace: ensemble with SRV: arcface_srv.py's settings, CosFace head (m = 0.35).

  python -m faceens.train --config=experiments/cosface_srv.py:demo --workdir=runs/cosface_srv
  python -m faceens.train --config=experiments/cosface_srv.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/cosface_srv.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_srv", variant)
  return configs.set_loss(c, "cosface")  # s = 64, m = 0.35 (Wang et al. 2018)
