"""ArcFace: SRV + ADP, arcface_adp.py's ADP settings with one shared class-weight matrix.

  python -m faceens.train --config=experiments/arcface_srv_adp.py:demo --workdir=runs/arcface_srv_adp

Paper grid: --config.adp.beta=10 or 50. 2 CPU cores: demo about 4 min, lfw about 10 min. Variants
and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.experiment("arcface_adp", variant)  # K = 3, (alpha, beta) = (2, 0.5)
  c.method = "srv_adp"         # the same ADP term, the members sharing one W (SRV)
  return c
