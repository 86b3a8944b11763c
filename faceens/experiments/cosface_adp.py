"""CosFace twin of arcface_adp.py: its method settings, the CosFace head (s = 64, m = 0.35)."""

from faceens import configs


def get_config(variant=None):  # Wang et al. 2018
  return configs.set_loss(configs.experiment("arcface_adp", variant), "cosface")
