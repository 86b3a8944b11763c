"""ArcFace: ensemble + ADP (Pang et al. 2019), (alpha, beta) = (2, 0.5).

  python -m faceens.train --config=experiments/arcface_adp.py:demo --workdir=runs/arcface_adp

Paper grid: --config.adp.beta=10 or 50. 2 CPU cores: demo about 4 min, lfw about 10 min. Variants
and commands: faceens/configs.py.
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
