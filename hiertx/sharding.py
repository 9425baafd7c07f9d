"""Device mesh and the mapping from logical axis names to mesh axes."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hiertx.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 (the rest) and checks the product is the device count."""
  sizes = [mesh_cfg[a] for a in AXES]
  for a, s in zip(AXES, sizes):
    if not isinstance(s, int) or isinstance(s, bool) or s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}", f"must be a positive size or -1 (the rest), got {s!r}")
  if sizes.count(-1) > 1:
    raise ConfigError("mesh", "at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError("mesh", f"fixed axes {dict(zip(AXES, sizes))} use {known} devices, "
                        f"which does not divide the {num_devices} available")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError("mesh", f"{dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices "
                      f"but {num_devices} are available; set one axis to -1 or change sizes")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES)


def rules(sharding_cfg) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in sharding_cfg.rules)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def batch_parallelism(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def process_batch_slice(mesh, process_index: int | None = None) -> tuple[int, int]:
  """(index, count): this process's devices hold block `index` of the global
  batch cut into `count` equal blocks of rows. Processes whose devices sit
  at the same place along the batch axes (data, fsdp) hold the same block,
  and must feed the same rows: with the `tensor` axis across processes,
  `count` is smaller than the process count."""
  process_index = jax.process_index() if process_index is None else process_index
  par = batch_parallelism(mesh)
  where = batch_sharding(mesh).devices_indices_map((par, 1))  # device -> (rows, cols)
  rows = sorted({where[d][0].start or 0 for d in mesh.devices.flat
                 if d.process_index == process_index})
  if not rows:
    raise ConfigError("mesh", f"process {process_index} has no device in the mesh")
  first, n = rows[0], len(rows)
  if rows != list(range(first, first + n)) or first % n or par % n:
    raise ConfigError("mesh", f"process {process_index}'s devices hold batch shards {rows} of "
                      f"{par}, not one aligned block: order the mesh so that each process "
                      "holds consecutive shards along (data, fsdp)")
  return first // n, par // n


def logical_shardings(abstract_boxed_tree, mesh, logical_rules):
  """Shardings of a pytree whose leaves may be logically partitioned boxes."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)
