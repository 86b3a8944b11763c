"""CosFace: an ensemble of K = 3, no diversity term:
arcface_baseline.py's settings, CosFace head (m = 0.35).

  python -m faceens.train --config=experiments/cosface_baseline.py:demo --workdir=runs/cosface_baseline
  python -m faceens.train --config=experiments/cosface_baseline.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/cosface_baseline.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_baseline", variant)
  return configs.set_loss(c, "cosface")  # s = 64, m = 0.35 (Wang et al. 2018)
