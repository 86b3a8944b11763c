"""Device mesh, batch placement and the sharded train step (data parallel over ``data``).

The batch is sharded over the mesh's ``data`` axis and the state replicated on every device; XLA
inserts the gradient all-reduce and computes BatchNorm statistics over the global batch. Each
host feeds its own slice of the global batch (``put_batch``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from faceens import logs


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes files and shows progress (True alone)."""
  return jax.process_index() == 0


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
  """The mesh attacks shard their batch over (this process's devices: with several processes
  each attacks its own pairs, ``faceens.attack.attack_pairs``), or ``None`` on one device."""
  return make_mesh(jax.local_devices()) if jax.local_device_count() > 1 else None


# ----------------------------------------------------------------------------- several processes


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None):
  """Joins this process to a multi-process JAX runtime (``jax.distributed.initialize``).

  Explicit form: all three of ``coordinator_address`` (``host:port`` of process 0, reachable from
  every process), ``num_processes`` and ``process_id`` (0 .. num_processes - 1), or the
  environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
  With none of them JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes).
  CPU collectives use gloo, so the same command runs on CPU machines as on GPU / TPU clusters
  (the setting only concerns the CPU backend). Call it before anything else touches JAX.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _int_setting(num_processes, "num_processes", "JAX_NUM_PROCESSES")
  process_id = _int_setting(process_id, "process_id", "JAX_PROCESS_ID")
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
    missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
    raise ValueError(f"the explicit multi-process form needs --coordinator_address, "
                     f"--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                     f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {missing}")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in 0..{num_processes - 1} for --num_processes="
                     f"{num_processes}, got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _int_setting(value, flag: str, env_name: str) -> int | None:
  if value is not None:
    return int(value)
  text = os.environ.get(env_name)
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"environment variable {env_name}={text!r} is not an integer "
                     f"(it stands for --{flag})") from None


def define_distributed_flags() -> None:
  """The command-line flags of ``initialize_job`` (shared by train and attack)."""
  flags.DEFINE_bool("distributed", False,
                    "join a multi-process run (jax.distributed): cluster auto-detection, or the "
                    "explicit form below / JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                    "JAX_PROCESS_ID")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed)")
  flags.DEFINE_integer("num_processes", None, "number of processes (implies --distributed)")
  flags.DEFINE_integer("process_id", None, "this process, 0 .. num_processes - 1 "
                       "(implies --distributed)")


def initialize_job():
  """The start of a command-line job (train, attack): absl logs at WARNING unless ``--verbosity``
  says otherwise (``faceens.logs.default_verbosity``), and ``initialize_distributed`` when
  ``--distributed`` or any part of the explicit form is given; a bad setting exits with a one-line error. Returns absl's ``FLAGS``."""
  FLAGS = flags.FLAGS  # noqa: N806
  logs.default_verbosity()
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.distributed or any(v is not None for v in explicit):
    try:
      initialize_distributed(*explicit)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
  return FLAGS
