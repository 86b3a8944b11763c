"""Adversarial attacks on face feature extractors (LOTS and its step rules)."""

from faceens.attacks.lots import (METHODS, OBJECTIVES, AttackConfig, attack, attack_with_restarts,
                                  make_losses, run_loop, tau_curve)

__all__ = ["METHODS", "OBJECTIVES", "AttackConfig", "attack", "attack_with_restarts",
           "make_losses", "run_loop", "tau_curve"]
