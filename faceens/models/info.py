"""Parameter count and GFLOPs of MobileFaceNet: ``python -m faceens.models.info [--size 112]``.

GFLOPs are XLA's cost analysis of one forward pass at batch 1 (2 x multiply-accumulates), with
the native depthwise convolution so that the count is the network's, not the CPU formulation's.
Published reference: InsightFace MobileFaceNet (ms1m-refine-v1): 0.993 M params, 0.449 GFLOPs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from faceens.models.mobilefacenet import HEADS, MobileFaceNet


def model_info(size: int = 112, width: float = 1.0, head: str = "gdc", embedding_dim: int = 512,
               blocks=(1, 4, 6, 2)) -> dict:
  m = MobileFaceNet(embedding_dim=embedding_dim, width=width, blocks=tuple(blocks), head=head,
                    depthwise_impl="native")
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
  params = sum(int(p.size) for p in jax.tree.leaves(v["params"]))
  cost = jax.jit(lambda vv, xx: m.apply(vv, xx)).lower(v, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {"size": size, "width": width, "head": head, "params": params,
          "gflops": float(cost.get("flops", float("nan"))) / 1e9}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--width", type=float, default=1.0)
  a = p.parse_args()
  print(f"{'head':>18} {'params':>12} {'GFLOPs':>8}")
  for head in HEADS:
    i = model_info(a.size, a.width, head)
    print(f"{head:>18} {i['params'] / 1e6:>11.3f}M {i['gflops']:>8.3f}")
  print(f"{'InsightFace mbf':>18} {0.993:>11.3f}M {0.449:>8.3f}  (published, ms1m-refine-v1)")


if __name__ == "__main__":
  main()
