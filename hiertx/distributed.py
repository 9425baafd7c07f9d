"""Multi-process start-up through JAX's own distributed runtime.

Where the coordinator comes from, in order:
  1. explicit flags (--coordinator_address, --num_processes, --process_id);
  2. the cluster's environment, detected by `jax.distributed.initialize()`
     itself: SLURM (`SLURM_*` variables, one task per host) and Cloud TPU VMs;
  3. otherwise a single process, nothing to initialise.
Must run before anything touches a JAX backend. CPU-only multi-process runs
(`JAX_PLATFORMS=cpu`, as `launch/multiprocess.py` sets) use gloo collectives.
"""

import os

import jax
from absl import flags, logging


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (default: from SLURM / TPU VM environment).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def in_cluster_environment() -> bool:
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm or tpu_pod


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts the distributed runtime when this is one process of several."""
  if coordinator_address is None and not in_cluster_environment():
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)
