"""ArcFace: ensemble + ADP (Pang et al. 2019), (alpha, beta) = (2, 0.5).

  python -m faceens.train --config=experiments/arcface_adp.py:demo --workdir=runs/arcface_adp
  python -m faceens.train --config=experiments/arcface_adp.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_adp.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 7 min, lfw about 17 min (srv_fdp alone: 16.7);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.adp.beta=10 or 50.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "adp"             # loss: sum_k CE_k - ADP (Eq. 4), member heads of their own
  c.ensemble.num_members = 3   # K = 3 in every ensemble of the paper
  c.adp = configs.group(
      alpha=2.0,               # weight of the ensemble entropy: Pang et al.'s value
      beta=0.5,                # weight of the log ensemble diversity: best of the grid 0.5, 10, 50
      logits="cosine")         # g_k = softmax(s cos theta): the paper does not say (losses.py)
  return c
