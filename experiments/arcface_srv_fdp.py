"""ArcFace: SRV + FDP, gamma = 10: the paper's method.

  python -m faceens.train --config=experiments/arcface_srv_fdp.py:demo --workdir=runs/arcface_srv_fdp
  python -m faceens.train --config=experiments/arcface_srv_fdp.py --config.data.root=DIR --workdir=...

Variants: full (default; the paper recipe on MS1MV2, 20 epochs of 5.8M images: days on one GPU),
demo (bundled ORL faces, minutes on a 2-core CPU), lfw (LFW in its own layout,
--config.data.root=DIR: people of folds 1-5 train, the pairs of folds 6-10 test; 6-17 minutes
on a 2-core CPU), test (seconds).
"""

from faceens.configs import method_config


def get_config(variant=None):
  return method_config("srv_fdp", "arcface", variant)
