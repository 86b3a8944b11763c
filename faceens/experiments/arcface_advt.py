"""ArcFace: a single model with MTER adversarial training (Zhong & Deng 2019), margin 0.6.

  python -m faceens.train --config=experiments/arcface_advt.py:demo --workdir=runs/arcface_advt

Paper grid: --config.advt.margin=0.2, 1.4 or 3.0. 2 CPU cores: demo about 8 min, lfw about 35 min.
Variants and commands: faceens/configs.py.
"""

from faceens import configs


def get_config(variant=None):
  c = configs.base_config("arcface", variant)  # s = 64, m = 0.5 (Deng et al. 2019)
  c.method = "advt"            # loss: CE + weight * MTER's triplet hinge on crafted faces
  c.ensemble.num_members = 1   # AdvT trains one network (the paper's "AdvT")
  c.advt = configs.group(
      margin=0.6,              # best of the paper's grid 0.2, 0.6, 1.4, 3.0
      iters=10,                # MTER's I-FGSM steps per batch (Zhong & Deng)
      step_size=1.0 / 255,     # one grey level per step, pixels in [0, 1]
      epsilon=8.0 / 255,       # L_inf bound of the crafted perturbation (MTER)
      weight=1.0)              # MTER term added to the CE with weight 1
  if c.variant == "lfw":
    # 3 sign steps of 3/255 to the same 8/255 ball: every step is a forward and backward pass,
    # and 10 would make this single model cost more than an ensemble on a CPU.
    c.advt.iters, c.advt.step_size = 3, 3.0 / 255
  elif c.variant == "test":
    c.advt.iters = 2
  return c
