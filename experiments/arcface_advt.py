"""ArcFace: single model with MTER adversarial training (Zhong & Deng 2019), m = 0.6; grid: --config.advt.margin=0.2, 1.4 or 3.0.

  python -m faceens.train --config=experiments/arcface_advt.py:demo --workdir=runs/arcface_advt
  python -m faceens.train --config=experiments/arcface_advt.py --config.data.root=DIR --workdir=...

Variants: full (default; the paper recipe on MS1MV2, 20 epochs of 5.8M images: days on one GPU),
demo (bundled ORL faces, minutes on a 2-core CPU), lfw (LFW in its own layout,
--config.data.root=DIR: people of folds 1-5 train, the pairs of folds 6-10 test; 6-17 minutes
on a 2-core CPU), test (seconds).
"""

from faceens.configs import method_config


def get_config(variant=None):
  return method_config("advt", "arcface", variant)
