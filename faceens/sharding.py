"""Device mesh, batch placement and the sharded train step (data parallel over ``data``).

The batch is sharded over the mesh's ``data`` axis and the state replicated on every device; XLA
inserts the gradient all-reduce and computes BatchNorm statistics over the global batch. Each
host feeds its own slice of the global batch (``put_batch``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process), axis ``data``."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def shard_train_step(train_step, mesh: Mesh, state):
  """jit with the batch sharded over ``data`` and the state replicated on every device."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, state)
  return jax.jit(train_step, in_shardings=(state_sharding, batch, batch),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def replicate(tree, mesh: Mesh):
  """Places ``tree`` on every device, with the sharding the jitted step returns (so the step
  compiles once: an uncommitted input state would make the second call compile again)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def put_batch(mesh: Mesh, images: np.ndarray, labels: np.ndarray):
  """This host's batch slice -> global arrays sharded over ``data``."""
  sharding = NamedSharding(mesh, P("data"))
  return (jax.make_array_from_process_local_data(sharding, images),
          jax.make_array_from_process_local_data(sharding, labels))


def attack_mesh() -> Mesh | None:
  """The mesh attacks shard their batch over, or ``None`` on a single device."""
  return make_mesh() if jax.device_count() > 1 else None
