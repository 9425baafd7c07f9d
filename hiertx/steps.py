"""A run built from a config: the model, mesh, shardings and jitted step
functions, shared by training, evaluation, generation and the benchmarks.

  run = build_run(config)              # validated; nothing allocated yet
  state = run.init(rng)                # sharded on the mesh
  state, metrics = run.train_step(state, run.put_batch(batch))
  run.evaluate(state.params, batches)  # loss, perplexity, bits per byte

Step functions are pure and module-level; `build_run` jits them with
in/out shardings and donation.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hiertx import attention, device_stats
from hiertx import boundaries
from hiertx import checkpoint
from hiertx import config as config_lib
from hiertx import cost
from hiertx import data
from hiertx import layers
from hiertx import metrics
from hiertx import models
from hiertx import optimizer
from hiertx import sharding
from hiertx import vocab as vocab_lib
from hiertx import xla_options
from hiertx.errors import CheckpointError, ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------
# Pure step functions.


def token_nll(logits_BxTxV, targets_BxT):
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def apply_model(model, params, batch, deterministic=True, rngs=None):
  """Logits, and what the pass added to the auxiliary collections
  (hiertx.boundaries: training losses and boundary counts) as
  {collection: {name: scalar summed over modules}}."""
  logits, aux = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                            batch["positions"], deterministic=deterministic, rngs=rngs,
                            mutable=[boundaries.LOSSES, boundaries.STATS])
  return logits, {c: _sum_by_name(aux.get(c, {})) for c in (boundaries.LOSSES,
                                                                boundaries.STATS)}


def _sum_by_name(tree) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
    out[name] = out.get(name, 0.0) + leaf
  return out


def boundary_metrics(prefix: str, stats: dict) -> dict:
  """Content groups: closes, and closes the rules dropped or forced, per
  real position."""
  if "positions" not in stats:
    return {}
  n = jnp.maximum(stats["positions"], 1.0)
  out = {f"{prefix}/boundary_rate": stats["closes"] / n,
         f"{prefix}/dropped_closes": stats["dropped"] / n,
         f"{prefix}/forced_closes": stats["forced"] / n}
  if "positions_1" in stats:  # H-Net's second stage: closes per first-stage chunk
    out[f"{prefix}/boundary_rate_1"] = stats["closes_1"] / jnp.maximum(stats["positions_1"], 1.0)
  return out


def train_step(state: TrainState, batch, *, model, tx, seed: int, skip_nonfinite: bool = False):
  """One optimizer step; returns the new state and scalar metrics.

  With `skip_nonfinite`, a step whose loss or gradients are not finite leaves
  parameters and optimizer state unchanged (the step counter still advances).
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

  def loss_fn(params):
    logits, aux = apply_model(model, params, batch, deterministic=False,
                              rngs={"dropout": rng})
    w = batch["weights"].astype(jnp.float32)
    loss = (token_nll(logits, batch["targets"]) * w).sum() / jnp.maximum(w.sum(), 1.0)
    # Auxiliary losses (a boundary source's own) train beside the model's.
    return loss + sum(aux[boundaries.LOSSES].values(), 0.0), (loss, aux)

  (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  if skip_nonfinite:
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(ok, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new, {"train/loss": loss, "train/grad_norm": grad_norm,
               **{f"train/{k}": v for k, v in aux[boundaries.LOSSES].items()},
               **boundary_metrics("train", aux[boundaries.STATS])}


def eval_step(params, batch, *, model, bytes_V):
  """Sums over a batch: nll (nats), scored tokens, and the bytes they stand for."""
  logits, aux = apply_model(model, params, batch)
  w = batch["weights"].astype(jnp.float32)
  return {"nll": (token_nll(logits, batch["targets"]) * w).sum(),
          "tokens": w.sum(),
          "bytes": (bytes_V[batch["targets"]] * w).sum(),
          **aux[boundaries.STATS]}


# ----------------------------------------------------------------------------
# Building a run.


@dataclasses.dataclass(frozen=True)
class _InMesh:
  """A jitted function called (and lowered) under its mesh and logical axis rules."""

  fn: Any
  mesh: jax.sharding.Mesh
  rules: tuple

  def __call__(self, *args):
    with jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)


@dataclasses.dataclass
class Run:
  """Everything built from a config: the model, mesh, shardings and jitted steps."""

  config: Any
  mesh: jax.sharding.Mesh
  model: models.base.LanguageModel
  vocab: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying shardings
  init: Any
  train_step: Any
  eval_step: Any

  @property
  def align(self) -> int:
    """Where pieces start in packed rows (hiertx.data): the model's pooling factor."""
    return data.alignment(self.config.data, self.model.pooling_multiple())

  @functools.cached_property
  def data_shard(self) -> data.Shard:
    """The rows of each global batch this process reads (hiertx.data): by
    where its devices sit along the batch axes, so processes that the mesh
    makes replicas of each other read the same rows."""
    return data.Shard(*sharding.process_batch_slice(self.mesh))

  def put_batch(self, batch: dict) -> dict:
    """This process's rows [B / count, T] as global arrays [B, T] on the mesh."""
    s = sharding.batch_sharding(self.mesh)
    count = self.data_shard.count
    return {k: jax.make_array_from_process_local_data(s, v, (v.shape[0] * count, *v.shape[1:]))
            for k, v in batch.items()}

  def evaluate(self, params, batches) -> dict:
    sums = {}
    for b in batches:
      out = jax.device_get(self.eval_step(params, self.put_batch(b)))
      for k in out:
        sums[k] = sums.get(k, 0.0) + float(out[k])
    sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0, **sums}
    return metrics.summarize_eval(sums)


def check_mesh_fits(model, abstract_boxed_params, mesh, rules, seq_len: int,
                    batch_sizes: dict) -> None:
  """Every dimension a parameter or activation is sharded over divides by its
  mesh axes, or one `config.mesh.<axis>` line before anything compiles."""
  entries = sharding.parameter_entries(abstract_boxed_params)
  if sharding.splits_beyond_batch(mesh, rules):
    # The activations' shapes, from a trace of the forward pass (nothing runs).
    par = sharding.batch_parallelism(mesh)
    ids = jax.ShapeDtypeStruct((par, seq_len), jnp.int32)
    batch = {"inputs": ids, "segment_ids": ids, "positions": ids}
    with layers.recorded_constraints() as seen:
      jax.eval_shape(lambda p, b: apply_model(model, p, b), nn.unbox(abstract_boxed_params),
                     batch)
    # Batch dimensions are the batch sizes' (below), not this trace's.
    entries += [(f"an activation {list(dims)[1:]} per row", dims[1:], names[1:])
                for dims, names in dict.fromkeys(seen) if names and names[0] == "batch"]
  entries += [(f"{section}.batch_size", (size,), ("batch",))
              for section, size in batch_sizes.items()]
  sharding.check_fits(entries, mesh, rules)


def build_run(config, devices=None, check_data: bool = True) -> Run:
  """Validates the config and builds the sharded model and step functions.

  `devices` (default: all) lets tests and tools use part of the machine;
  `check_data=False` skips checking the corpus (generation reads none).
  """
  config_lib.validate(config)
  if check_data:
    data.check_data(config.data)
  mesh = sharding.make_mesh(config.mesh, devices)
  par = sharding.batch_parallelism(mesh)
  for section in ("data", "eval"):
    if config[section].batch_size % par:
      raise ConfigError(f"{section}.batch_size", f"{config[section].batch_size} is not "
                        f"divisible by the data-parallel size {par} (mesh.data x mesh.fsdp)")
  platform = mesh.devices.flat[0].platform
  needs = {"cudnn": "gpu", "splash": "tpu", "pallas": "gpu"}
  for field in ("attention", "attention_fallback"):
    kind = config.model.get(field)
    if kind in needs and platform != needs[kind]:
      raise ConfigError(f"model.{field}", f"{kind} runs on {needs[kind].upper()}s; these "
                        f"devices are {platform}: use blockwise")
  vocab = vocab_lib.vocabulary(config.data.vocab)
  model = models.build(config.model, vocab.vocab_size, config.data.seq_len,
                       data.cross_document(config.data))
  tx = optimizer.make(config.train)
  rules = sharding.rules(config.sharding)
  seq = config.data.seq_len

  def init_boxed(rng):
    tokens = jnp.zeros((1, seq), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  check_mesh_fits(model, abstract_boxed.params, mesh, rules, seq,
                  {s: config[s].batch_size for s in ("data", "eval")})
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(abstract_boxed), state_shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_s = sharding.batch_sharding(mesh)

  def in_mesh(fn):
    # Tracing (first call or .lower) must see the mesh and the logical rules.
    return _InMesh(fn, mesh, rules)

  options = xla_options.compile_options()
  init = in_mesh(jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=state_shardings))
  step = in_mesh(jax.jit(functools.partial(train_step, model=model, tx=tx, seed=config.train.seed,
                                           skip_nonfinite=config.train.max_nonfinite_skips > 0),
                         in_shardings=(state_shardings, batch_s),
                         out_shardings=(state_shardings, replicated), donate_argnums=0,
                         compiler_options=options))
  bytes_V = jnp.asarray(vocab.token_bytes(), jnp.float32)
  evals = in_mesh(jax.jit(functools.partial(eval_step, model=model, bytes_V=bytes_V),
                          in_shardings=(state_shardings.params, batch_s),
                          out_shardings=replicated, compiler_options=options))
  return Run(config, mesh, model, vocab, tx, state_shardings, abstract_state, init, step, evals)


def batch_spec(config, run: Run) -> dict:
  shape = (config.data.batch_size, config.data.seq_len)
  s = sharding.batch_sharding(run.mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
          for k in ("inputs", "targets", "weights", "segment_ids", "positions")}


def attention_sites(run: Run, config) -> list:
  """Every attention call of the model's forward pass with the implementation
  it gets (`attention.Site`), from a trace (nothing compiled). Raises the
  ConfigError of a site the configured kernel cannot take."""
  with attention.record_sites() as sites:
    with jax.sharding.set_mesh(run.mesh), nn.logical_axis_rules(run.train_step.rules):
      jax.eval_shape(lambda p, b: apply_model(run.model, p, b)[0], run.abstract_state.params,
                     batch_spec(config, run))
  return list(sites)


def compile_train_step(run: Run, config):
  """Compiles the train step ahead of time (no device memory used).

  Returns the executable, which the loop then calls (so the step is compiled
  once), and the once-per-run numbers read from it; `attention/sites` holds
  the lines of `attention.sites_text`.
  """
  with attention.record_sites() as sites:  # filled as lowering traces the model
    compiled = run.train_step.lower(run.abstract_state, batch_spec(config, run)).compile()
  sites = sites or attention_sites(run, config)  # an earlier lowering's trace was reused
  facts = compiled_facts(compiled, run)
  lines = attention.sites_text(sites)
  if run.model.documents == "visible":
    lines.append("documents in a packed row see each other (data.cross_document_attention)")
  facts["attention/sites"] = "\n".join(lines)
  return compiled, facts


def compiled_facts(compiled, run: Run) -> dict:
  """XLA memory analysis and FLOPs of a compiled train step, next to the
  analytic prediction (`hiertx.cost`) of both."""
  facts = device_stats.xla_memory(compiled)
  # Loops left in the program (blockwise attention has none; retina's chunked
  # windows and scanned layers do): each runs its body one iteration at a time.
  facts["xla/while_loops"] = compiled.as_text().count(" while(")
  flops = device_stats.xla_flops(compiled)
  # XLA's cost analysis counts a loop body once, not once per iteration, so
  # its FLOPs are only meaningful for unrolled blocks.
  if flops is not None and not run.config.model.scan_layers:
    facts["flops/step_xla_per_device"] = flops  # one partition of the SPMD program
    facts["flops/step_xla"] = flops * run.mesh.size
  facts.update(cost.predict(run.config, run.vocab.vocab_size))
  return facts


# ----------------------------------------------------------------------------
# A trained run's parameters, for evaluation and generation.


def load_params(workdir: str, step: int | None = None, mesh: str = "data=-1", devices=None,
                seq_len: int | None = None, needs_data: bool = True):
  """(config, run, step, params) of a workdir's checkpoint (default: the newest):
  the parameters alone, restored onto `mesh` whatever mesh they were saved
  from. `seq_len` builds the run for another length than training's;
  generation (`needs_data=False`) does not check the corpus."""
  config = checkpoint.load_config(workdir)
  config.mesh.update(sharding.parse_mesh(mesh))
  if seq_len is not None:
    config.data.seq_len = seq_len
  run = build_run(config, devices, check_data=needs_data)
  mngr = checkpoint.manager(workdir)
  try:
    saved = mngr.all_steps()
    if not saved:
      raise CheckpointError(f"{workdir!r} has no checkpoints")
    step = max(saved) if step is None else step
    if step not in saved:
      raise CheckpointError(f"{workdir!r} has no checkpoint at step {step}; it has "
                            f"{sorted(saved)}")
    params = checkpoint.restore_params(mngr, step, run.abstract_state)
  finally:
    mngr.close()
  return config, run, step, params
