"""ArcFace: SRV + ADP, arcface_adp.py's ADP settings with one shared class-weight matrix.

  python -m faceens.train --config=experiments/arcface_srv_adp.py:demo --workdir=runs/arcface_srv_adp
  python -m faceens.train --config=experiments/arcface_srv_adp.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_srv_adp.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.adp.beta=10 or 50.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_adp", variant)  # K = 3, (alpha, beta) = (2, 0.5)
  c.method = "srv_adp"         # the same ADP term, the members sharing one W (SRV)
  return c
