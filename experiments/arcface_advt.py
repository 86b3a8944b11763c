"""ArcFace: a single model with MTER adversarial training (Zhong & Deng 2019), margin 0.6.

  python -m faceens.train --config=experiments/arcface_advt.py:demo --workdir=runs/arcface_advt
  python -m faceens.train --config=experiments/arcface_advt.py:lfw --config.data.root=LFW_DIR --workdir=DIR
  python -m faceens.train --config=experiments/arcface_advt.py --config.data.root=FACES_EMORE --workdir=DIR

Cost on a 2-core CPU: demo about 8 min, lfw about 35 min with 3 MTER
steps (34.6 measured, sharing the cores);
full (the paper's 20 epochs of MS1MV2): days on one GPU.
Variants and the shared recipe: faceens/configs.py.

Grid of the paper: --config.advt.margin=0.2, 1.4 or 3.0.
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
