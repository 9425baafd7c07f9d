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


# What a user changes to make a logically named dimension fit, by logical axis.
_FIELD_OF = {"heads": "model.num_heads", "mlp": "model.mlp_dim", "embed": "model.d_model",
             "kv": "the head width (model.d_model / model.num_heads)", "length": "data.seq_len",
             "vocab": "the vocabulary (padded to a multiple of 128)",
             "layers": "the number of scanned blocks", "batch": "the batch size"}


def _ways(entry, shape: dict) -> tuple[tuple[str, ...], int]:
  """The mesh axes (of more than one device) a PartitionSpec entry splits a
  dimension over, and into how many parts."""
  axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  axes = tuple(a for a in axes if shape[a] > 1)
  return axes, math.prod(shape[a] for a in axes)


def misfit(entries, shape: dict, logical_rules):
  """The first (what, dim size, logical name, mesh axes, parts) whose size the
  mesh `shape` ({axis: size}) does not divide, or None. `entries` are
  (what, shape, logical axis names) of parameters and activations."""
  for what, dims, names in entries:
    spec = nn.logical_to_mesh_axes(names, logical_rules)
    for size, name, entry in zip(dims, names, spec):
      axes, parts = _ways(entry, shape)
      if size % parts:
        return what, size, name, axes, parts
  return None


def factorisations(n: int) -> list[dict]:
  """Every mesh {data, fsdp, tensor} of `n` devices, data-heavy first."""
  return [dict(zip(AXES, (d, f, n // (d * f)))) for d in range(n, 0, -1) if n % d == 0
          for f in range(n // d, 0, -1) if (n // d) % f == 0]


def fitting_meshes(entries, shape: dict, logical_rules, limit: int = 2) -> list[dict]:
  """Up to `limit` meshes of as many devices as `shape` that every entry fits,
  nearest first (fewest doublings and halvings of the axes)."""
  fits = [m for m in factorisations(math.prod(shape.values()))
          if misfit(entries, m, logical_rules) is None]
  far = lambda m: sum(abs(math.log2(m[a] / shape[a])) for a in AXES)
  return sorted(fits, key=lambda m: (far(m), [-m[a] for a in AXES]))[:limit]


def check_fits(entries, mesh, logical_rules) -> None:
  """Refuses, in one `config.mesh.<axis>` line, a mesh that does not divide
  a dimension some parameter or activation is sharded over by the rules."""
  shape = dict(mesh.shape)
  bad = misfit(entries, shape, logical_rules)
  if bad is None:
    return
  what, size, name, axes, parts = bad
  over = " x ".join(f"mesh.{a}={shape[a]}" for a in axes)
  alternatives = [" ".join(f"--config.mesh.{a}={m[a]}" for a in AXES)
                  for m in fitting_meshes(entries, shape, logical_rules)]
  offer = (f"meshes of {math.prod(shape.values())} devices that fit: "
           + "; ".join(alternatives)) if alternatives else "no mesh of these devices fits"
  field = f"mesh.{axes[-1]}" if len(axes) == 1 else "mesh"
  raise ConfigError(field, f"{over} splits dimension '{name}' of {what} ({size}) into {parts} "
                    f"parts, which do not divide it; {offer}; or make "
                    f"{_FIELD_OF.get(name, name)} a multiple of {parts}")


def splits_beyond_batch(mesh, logical_rules) -> bool:
  """Whether a logical axis other than the batch is split over more than one
  device (only then can an activation's other dimensions misfit the mesh)."""
  for name, entry in logical_rules:
    if name != "batch" and _ways(entry, dict(mesh.shape))[1] > 1:
      return True
  return False


def parameter_entries(abstract_boxed_params) -> list:
  """(path, shape, logical names) of every logically partitioned parameter."""
  leaves = jax.tree_util.tree_flatten_with_path(
      abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  out = []
  for path, leaf in leaves:
    if isinstance(leaf, nn.LogicallyPartitioned):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      out.append((f"parameter {name} {list(leaf.value.shape)}", leaf.value.shape, leaf.names))
  return out


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
  out = {"data": 1, "fsdp": 1, "tensor": 1}
  for item in filter(None, text.split(",")):
    axis, _, size = item.partition("=")
    if axis not in out or not size.lstrip("-").isdigit():
      raise ConfigError("mesh", f"--mesh={text!r}: expected items like data=2,fsdp=4")
    out[axis] = int(size)
  return out
