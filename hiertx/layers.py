"""Transformer pieces shared by every model: embeddings, attention, MLP, blocks.

Shapes are in names: B batch, T/Q/S lengths (queries, keys), D model width,
H heads, K head width, V vocabulary, F feed-forward width, C cache slots,
N blocks of a stack.

Parameters and activations carry logical axis names (`batch`, `length`,
`embed`, `mlp`, `heads`, `kv`, `vocab`); `hiertx.sharding` maps them to mesh
axes, so the modules never name devices.

Every module here serves the forward pass and incremental decoding alike
(docs/design.md section 5): a block's `step` runs one new position against its
key/value cache with the same submodules its `__call__` uses, and the forward
pass `remember`s what a decoder's caches are built from.
"""

import contextlib
import contextvars
import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hiertx import attention as attention_lib

# The variable collection the forward pass fills for a decoder's prompt pass;
# not mutable (so free) everywhere else.
DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Hyper-parameters of one transformer block, shared by all scales."""

  d_model: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  positions: str = "learned"  # "learned" | "rotary" | "none"
  dtype: str = "float32"
  remat: str = "none"  # see REMAT_POLICIES
  scan: bool = False  # repeated blocks as one lax.scan (see scan_blocks)
  attention: attention_lib.AttentionConfig = attention_lib.AttentionConfig()
  weight_init: str = "lecun"  # matrices' initialisation (INITS)
  position_init: float = 0.02  # standard deviation of learned positions

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


# While `recorded_constraints` is active: (shape, logical axes) of every
# activation `constrain` names, so a mesh can be checked against them before
# anything compiles (hiertx.sharding.check_fits).
_RECORDED: contextvars.ContextVar = contextvars.ContextVar("recorded_constraints", default=None)


@contextlib.contextmanager
def recorded_constraints():
  """Collects [(shape, logical axes)] of the activations constrained while active."""
  seen = []
  token = _RECORDED.set(seen)
  try:
    yield seen
  finally:
    _RECORDED.reset(token)


def constrain(x: jax.Array, *axes: Optional[str]) -> jax.Array:
  """Names the logical axes of an activation for the partitioner."""
  seen = _RECORDED.get()
  if seen is not None:
    seen.append((tuple(x.shape), axes))
  return nn.with_logical_constraint(x, axes)


def over_tokens(fn, x_NxD: jax.Array) -> jax.Array:
  """`fn` (a map over the last axis, such as a matmul) applied with every
  leading axis merged into one token axis, [..., D] -> [..., F].

  Same numbers as applying it to [B, L, D], but the weight gradient of a
  matmul then contracts one token axis instead of two: XLA:CPU runs it, and
  the transposes around it, in its matmul library, where batch and length as
  two contracting axes got a layout copy and a generic dot (docs/performance.md,
  "Tokens as one axis"). Elsewhere the reshapes are free."""
  lead = x_NxD.shape[:-1]
  y_NxF = fn(x_NxD.reshape(-1, x_NxD.shape[-1]))
  return y_NxF.reshape(*lead, *y_NxF.shape[1:])


def _init(axes, init=nn.initializers.lecun_normal()):
  return nn.with_logical_partitioning(init, axes)


# Matrices' initialisation, each variance 1/fan_in times the scale: LeCun's
# truncated normal (flax's default), or the uniform distribution on
# +-1/sqrt(fan_in) of PyTorch's nn.Linear (variance 1/(3 fan_in)).
INITS = {"lecun": (1.0, "truncated_normal"), "torch": (1 / 3, "uniform")}


def kernel_init(cfg: "BlockConfig", axes, in_axis=-2, out_axis=-1):
  """The initialiser of a matrix with logical `axes` under `cfg.weight_init`."""
  scale, distribution = INITS[cfg.weight_init]
  return _init(axes, nn.initializers.variance_scaling(scale, "fan_in", distribution,
                                                      in_axis=in_axis, out_axis=out_axis))


def remember(module: nn.Module, name: str, value) -> None:
  """Keeps `value` for a decoder's prompt pass (a no-op unless DECODE is mutable)."""
  module.sow(DECODE, name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)


def rotary(x_BxLxHxK: jax.Array, pos) -> jax.Array:
  """Rotary position embedding at explicit (possibly coarse) positions, [L] or [B, L]."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_K2 = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  pos_BxL = jnp.asarray(pos).astype(jnp.float32)
  pos_BxL = pos_BxL[None] if pos_BxL.ndim == 1 else pos_BxL
  angle = pos_BxL[..., None] * freq_K2
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:2 * half]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], -1)
  return out.astype(x_BxLxHxK.dtype)


@flax.struct.dataclass
class KV:
  """Keys (rotated at their end positions) and values, [..., B, C, H, K]."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def empty(cls, cfg: BlockConfig, *shape: int) -> "KV":
    """Zeros of shape (*shape, H, K) in the model's dtype."""
    full = (*shape, cfg.num_heads, cfg.head_dim)
    return cls(jnp.zeros(full, cfg.jnp_dtype), jnp.zeros(full, cfg.jnp_dtype))

  def set(self, idx, new: "KV") -> "KV":
    """Slot `idx` of the cache axis (-3) set to `new`'s single entry; `idx` of
    shape [B] sets one slot per row (a row with a slot outside the cache keeps
    its cache as it was)."""
    if jnp.ndim(idx) == 1:
      put = lambda c, x: set_rows(c, idx, x[..., 0, :, :], axis=-3)
    else:
      put = lambda c, x: jax.lax.dynamic_update_index_in_dim(
          c, x[..., 0, :, :], idx, c.ndim - 3)
    return KV(put(self.k, new.k), put(self.v, new.v))

  def filled(self, capacity: int, count) -> "KV":
    """A buffer of `capacity` slots holding the first `count` entries (rest 0;
    `count` may be [B], per row)."""
    return KV(filled(self.k, capacity, count, axis=-3), filled(self.v, capacity, count, axis=-3))


def set_rows(cache, idx_B, value, axis: int = 1):
  """`cache` with slot idx_B[b] of `axis` set to value[b] in each row b (the
  axis before `axis` is the batch); rows whose index is outside the cache
  (e.g. -1) are left as they were."""
  axis = axis % cache.ndim
  shape = [1] * cache.ndim
  shape[axis - 1], shape[axis] = idx_B.shape[0], cache.shape[axis]
  hit = (jnp.arange(cache.shape[axis]) == idx_B[:, None]).reshape(shape)
  return jnp.where(hit, jnp.expand_dims(value, axis).astype(cache.dtype), cache)


def filled(values, capacity: int, count, axis: int = 1):
  """`values` along `axis` cut or zero-padded to `capacity`, entries >= count
  zeroed; `count` of shape [B] counts per row (the axis before `axis`)."""
  axis = axis % values.ndim
  n = values.shape[axis]
  shape = [1] * values.ndim
  shape[axis] = n
  if jnp.ndim(count):
    shape[axis - 1] = count.shape[0]
    count = count[:, None]
  keep = (jnp.arange(n) < count).reshape(shape).astype(values.dtype)
  values = values * keep
  if n >= capacity:
    return jax.lax.slice_in_dim(values, 0, capacity, axis=axis)
  pad = [(0, 0)] * values.ndim
  pad[axis] = (0, capacity - n)
  return jnp.pad(values, pad)


def site_name(module: nn.Module) -> str:
  """A module's path in the model (e.g. body/pre_0/attn), naming attention sites."""
  return "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""


def attention_ends(query, key):
  """The (query, key) ends attention compares for two `scales.Scale`s: static
  when both scales have static ends, or for self-attention within one
  content-grouped scale (its order); per-row traced ends [B, L] otherwise."""
  if query.end_BxL is None and key.end_BxL is None:
    return query.end_L, key.end_L
  if query.end_BxL is not None and key.end_BxL is not None and query.spans == key.spans:
    return query.end_L, key.end_L  # a model has one content-grouped scale
  traced = lambda s: (s.end_BxL if s.end_BxL is not None
                      else jnp.broadcast_to(s.end_L, s.seg_BxL.shape))
  return traced(query), traced(key)


class Attention(nn.Module):
  """Multi-head attention from queries to any key set under the end rule.

  Positions given to `project_q` / `keys_values` are the *end positions* of
  the vectors (docs/design.md section 2), used by rotary embeddings so coarse keys
  sit where the information they summarise ends.
  """

  cfg: BlockConfig

  def setup(self):
    c = self.cfg
    shape_in, shape_out = (c.d_model, c.num_heads, c.head_dim), (c.num_heads, c.head_dim, c.d_model)
    init_in = kernel_init(c, ("embed", "heads", "kv"), 0, (1, 2))
    init_out = kernel_init(c, ("heads", "kv", "embed"), (0, 1), 2)
    self.wq = self.param("query", init_in, shape_in)
    self.wk = self.param("key", init_in, shape_in)
    self.wv = self.param("value", init_in, shape_in)
    self.wo = self.param("out", init_out, shape_out)

  # The projections stay [B, L, H, K] einsums rather than `over_tokens`:
  # flattened, they measured no faster on CPU (docs/performance.md, "Tokens as
  # one axis"), and a scanned stack keeps every reshaped copy of an input as
  # one more residual per block.
  def _in(self, w_DxHxK, x_BxLxD):
    return jnp.einsum("bld,dhk->blhk", x_BxLxD, w_DxHxK.astype(self.cfg.jnp_dtype))

  def _rotate(self, x_BxLxHxK, pos_L):
    return rotary(x_BxLxHxK, pos_L) if self.cfg.positions == "rotary" else x_BxLxHxK

  def project_q(self, x_BxQxD, end_Q):
    return self._rotate(self._in(self.wq, x_BxQxD), end_Q)

  def project_kv(self, x_BxSxD):
    """Keys and values before rotary, so callers may pool them first."""
    return self._in(self.wk, x_BxSxD), self._in(self.wv, x_BxSxD)

  def rotate_k(self, k_BxSxHxK, end_S):
    return self._rotate(k_BxSxHxK, end_S)

  def keys_values(self, x_BxSxD, end_S) -> KV:
    k, v = self.project_kv(x_BxSxD)
    return KV(self.rotate_k(k, end_S), v)

  def output(self, o_BxQxHxK):
    return jnp.einsum("bqhk,hkd->bqd", o_BxQxHxK, self.wo.astype(self.cfg.jnp_dtype))

  def __call__(self, x_BxQxD, query, kv: KV, key):
    """Queries from `x` (a Scale `query`) over rotated keys/values (a Scale `key`)."""
    q = self.project_q(x_BxQxD, query.rotary_pos)
    q_end, k_end = attention_ends(query, key)
    o = attention_lib.attend(q, kv.k, kv.v, q_end, k_end, query.seg_BxL, key.seg_BxL,
                             self.cfg.attention, site=site_name(self))
    return self.output(o)

  def over_cache(self, x_BxD, end, kv: KV, mask_C):
    """One decoding query (ending at `end`) over cached keys/values [B, C, H, K];
    `mask_C` is [C], or [B, C] when rows read different slots."""
    q = self.project_q(x_BxD[:, None], end[None])
    mask_BxC = mask_C if mask_C.ndim == 2 else mask_C[None]
    mask_Bx1xC = jnp.broadcast_to(mask_BxC[:, None], (x_BxD.shape[0], 1, mask_BxC.shape[-1]))
    o, _ = attention_lib.dense(q, kv.k, kv.v, mask_Bx1xC)
    return self.output(o)[:, 0]


class Mlp(nn.Module):
  cfg: BlockConfig

  def setup(self):
    c = self.cfg
    self.wi = nn.Dense(c.mlp_dim, use_bias=False, dtype=c.jnp_dtype,
                       kernel_init=kernel_init(c, ("embed", "mlp")))
    self.wo = nn.Dense(c.d_model, use_bias=False, dtype=c.jnp_dtype,
                       kernel_init=kernel_init(c, ("mlp", "embed")))
    self.drop = nn.Dropout(c.dropout)

  def __call__(self, x_BxTxD, deterministic: bool = True):
    h_BxTxF = nn.gelu(over_tokens(self.wi, x_BxTxD))
    if h_BxTxF.ndim == 3:
      h_BxTxF = constrain(h_BxTxF, "batch", "length", "mlp")
    return over_tokens(self.wo, self.drop(h_BxTxF, deterministic=deterministic))


def layer_norm(dtype) -> nn.LayerNorm:
  # Flax computes the statistics in float32 whatever `dtype` (mixed precision).
  return nn.LayerNorm(dtype=dtype, scale_init=_init(("embed",), nn.initializers.ones),
                      bias_init=_init(("embed",), nn.initializers.zeros))


class PreLN(nn.Module):
  """The pre-LN residual every block shares: x + attention(LN(x)), then
  + MLP(LN(x)), with dropout on both branches. A subclass sets up its
  attention beside `setup_residual()` and hands its output to `residual`."""

  cfg: BlockConfig

  def setup_residual(self):
    c = self.cfg
    self.ln_attn = layer_norm(c.jnp_dtype)
    self.ln_mlp = layer_norm(c.jnp_dtype)
    self.mlp = Mlp(c)
    self.drop = nn.Dropout(c.dropout)

  def residual(self, x_BxQxD, a_BxQxD, deterministic: bool):
    """The block's output for input `x` and attention output `a`."""
    x_BxQxD = constrain(x_BxQxD + self.drop(a_BxQxD, deterministic=deterministic),
                        "batch", "length", "embed")
    x_BxQxD = x_BxQxD + self.drop(self.mlp(self.ln_mlp(x_BxQxD), deterministic),
                                  deterministic=deterministic)
    return constrain(x_BxQxD, "batch", "length", "embed")

  def _finish(self, x_BxD, a_BxD):
    """`residual` for one decoded position (no dropout)."""
    x_BxD = x_BxD + a_BxD
    return x_BxD + self.mlp(self.ln_mlp(x_BxD))


class Block(PreLN):
  """Pre-LN transformer block; attends to itself, or (`cross`) to another
  sequence, whose keys are normalised by their own LayerNorm (the bottom-up
  aggregation layer, attention pooling and upsampling)."""

  cross: bool = False

  def setup(self):
    self.setup_residual()
    if self.cross:
      self.ln_kv = layer_norm(self.cfg.jnp_dtype)
    self.attn = Attention(self.cfg)

  def __call__(self, x_BxQxD, query, deterministic: bool = True):
    """Self-attention over the vectors of one scale (a Scale `query`)."""
    h = self.ln_attn(x_BxQxD)
    return self._attend(x_BxQxD, h, query, self.attn.keys_values(h, query.rotary_pos), query,
                        deterministic)

  def attend_to(self, x_BxQxD, query, kv_BxSxD, key, deterministic: bool = True):
    """Cross-attention from `x` (Scale `query`) to `kv` (Scale `key`)."""
    return self._attend(x_BxQxD, self.ln_attn(x_BxQxD), query,
                        self.cross_keys(kv_BxSxD, key.rotary_pos), key, deterministic)

  def _attend(self, x_BxQxD, h_BxQxD, query, keys: KV, key, deterministic: bool):
    remember(self, "kv", keys)  # a decoder's key/value cache
    return self.residual(x_BxQxD, self.attn(h_BxQxD, query, keys, key), deterministic)

  def prompt_keys(self, slots: int, count: int) -> KV:
    """The keys/values this block read in a prompt's forward pass, as a
    decoding cache of `slots` holding the first `count`."""
    return self.variables[DECODE]["kv"].filled(slots, count)

  def cross_keys(self, kv_BxSxD, end_S) -> KV:
    """Keys/values a cross block reads from another sequence."""
    return self.attn.keys_values(self.ln_kv(kv_BxSxD), end_S)

  def step(self, x_BxD, kv: KV, idx, end):
    """Self-attention decoding: the new vector at slot `idx` of this block's
    cache (ending at `end`) joins the cache and reads slots 0 .. idx. With
    `idx` of shape [B] each row uses its own slot (content-grouped scales)."""
    h = self.ln_attn(x_BxD)
    kv = kv.set(idx, self.attn.keys_values(h[:, None], end[None]))
    slots = jnp.arange(kv.k.shape[-3])
    a = self.attn.over_cache(h, end, kv, slots <= (idx[:, None] if jnp.ndim(idx) else idx))
    return self._finish(x_BxD, a), kv

  def cross_step(self, x_BxD, end, kv: KV, key_end_C):
    """Cross-attention decoding: one query over cached keys of the other
    sequence; slots whose vectors end after `end` are not read."""
    return self.cross_read(x_BxD, end, kv, key_end_C <= end)

  def cross_read(self, x_BxD, end, kv: KV, mask_BxC):
    """Cross-attention decoding over the cached slots `mask_BxC` ([C] or [B, C])."""
    return self._finish(x_BxD, self.attn.over_cache(self.ln_attn(x_BxD), end, kv, mask_BxC))


# Rematerialisation: which activations a block keeps for the backward pass.
#   none:  all of them (fastest, most memory)
#   block: only the block's input; everything inside is recomputed
#   dots:  the outputs of matmuls without batch dimensions (projections, MLP)
REMAT_POLICIES = {
    "block": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls, cfg: BlockConfig):
  """`module_cls` wrapped per `cfg.remat` (its `deterministic` argument static)."""
  if cfg.remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))


class _Scanned(nn.Module):
  """One block in the (carry, output) form `nn.scan` wants; `block_fields`
  are extra fields of the block class (retina's spec)."""

  block_cls: type
  cfg: BlockConfig
  block_fields: tuple

  def setup(self):
    self.block = self.block_cls(self.cfg, *self.block_fields)

  def __call__(self, x_BxTxD, scale, deterministic: bool):
    return self.block(x_BxTxD, scale, deterministic), None

  def step(self, x_BxD, cache, *broadcast):
    return self.block.step(x_BxD, cache, *broadcast)


def scan_blocks(block_cls, cfg: BlockConfig, num_blocks: int, *block_fields,
                step_args: int = 2) -> nn.Module:
  """`num_blocks` of `block_cls` as one `nn.scan`, parameters stacked on a
  leading `layers` axis. The forward pass broadcasts its scale; decoding
  (`step`) scans the stacked caches and broadcasts `step_args` more arguments.

  One compiled body instead of `num_blocks` copies: faster compiles, and with
  `cfg.remat` the backward pass really recomputes per block. (On XLA:CPU,
  `remat` of an unrolled loop saves nothing: the scheduler is free to run the
  recomputation early. Inside the scan's backward loop it cannot.)
  """
  cls = remat(_Scanned, cfg)

  def kwargs(in_axes):
    return dict(variable_axes={"params": 0, "intermediates": 0, DECODE: 0},
                split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                length=num_blocks, metadata_params={nn.PARTITION_NAME: "layers"})

  scanned = nn.scan(cls, methods={
      "__call__": kwargs((nn.broadcast, nn.broadcast)),
      "step": kwargs((0,) + (nn.broadcast,) * step_args)})
  return scanned(block_cls, cfg, block_fields)


def unstack(tree, i: int):
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def restack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


class Blocks(nn.Module):
  """`num_blocks` blocks applied in sequence (one scale's stack), unrolled
  (`block_0`, `block_1`, ...) or, with `cfg.scan`, scanned (`blocks/block`).

  Used as a mixin by `Stack` and by retina, which keeps its blocks at the top
  of its parameter tree.
  """

  def setup_blocks(self, block_cls, cfg: BlockConfig, n: int, *block_fields, step_args=2):
    self._blocks_n = n
    if n and cfg.scan:
      self.blocks = scan_blocks(block_cls, cfg, n, *block_fields, step_args=step_args)
    elif n:
      cls = remat(block_cls, cfg)
      self.block = {str(i): cls(cfg, *block_fields) for i in range(n)}

  def run_blocks(self, x, scale, deterministic: bool):
    if not self._blocks_n:
      return x
    if hasattr(self, "blocks"):
      return self.blocks(x, scale, deterministic)[0]
    for i in range(self._blocks_n):
      x = self.block[str(i)](x, scale, deterministic)
    return x

  def step_blocks(self, x_BxD, cache_N, *broadcast):
    """Decoding through every block; `cache_N` is stacked on a leading axis."""
    if not self._blocks_n:
      return x_BxD, cache_N
    if hasattr(self, "blocks"):
      return self.blocks.step(x_BxD, cache_N, *broadcast)
    new = []
    for i in range(self._blocks_n):
      x_BxD, c = self.block[str(i)].step(x_BxD, unstack(cache_N, i), *broadcast)
      new.append(c)
    return x_BxD, restack(new)

  def remembered(self, *path: str):
    """What every block `remember`ed at `path` (below the block), stacked on a
    leading axis."""
    sown = self.variables[DECODE]
    trees = [sown["blocks"]["block"]] if "blocks" in sown else [
        sown[f"block_{i}"] for i in range(self._blocks_n)]
    for key in path:
      trees = [t[key] for t in trees]
    return trees[0] if "blocks" in sown else restack(trees)


class Stack(Blocks):
  """`num_blocks` self-attention blocks at one scale."""

  cfg: BlockConfig
  num_blocks: int

  def setup(self):
    self.setup_blocks(Block, self.cfg, self.num_blocks)

  def __call__(self, x_BxTxD, scale, deterministic: bool = True):
    return self.run_blocks(x_BxTxD, scale, deterministic)

  def init_cache(self, batch: int, slots: int) -> KV:
    """Empty key/value caches of every block, [N, B, slots, H, K]."""
    return KV.empty(self.cfg, self.num_blocks, batch, slots)

  def step(self, x_BxD, kv_N: KV, idx, end):
    """A new vector at slot `idx` of this scale (ending at `end`) through every block."""
    return self.step_blocks(x_BxD, kv_N, idx, end)

  def prompt_cache(self, slots: int, count: int) -> KV:
    """The caches after the forward pass over a prompt whose first `count`
    vectors at this scale are real."""
    if not self.num_blocks:
      return self.init_cache(1, slots)
    return self.remembered("kv").filled(slots, count)


class Embed(nn.Module):
  """Token embedding plus learned positions (when configured)."""

  vocab_size: int
  cfg: BlockConfig
  max_len: int

  def setup(self):
    c = self.cfg
    self.token = self.param("token", _init(("vocab", "embed"), nn.initializers.normal(1.0)),
                            (self.vocab_size, c.d_model))
    if c.positions == "learned":
      self.position = self.param(
          "position", _init((None, "embed"), nn.initializers.normal(c.position_init)),
          (self.max_len, c.d_model))
    self.drop = nn.Dropout(c.dropout)

  def __call__(self, tokens_BxT, positions_BxT, deterministic: bool = True):
    c = self.cfg
    x_BxTxD = jnp.take(self.token, tokens_BxT, axis=0).astype(c.jnp_dtype)
    if c.positions == "learned":
      pos_BxT = jnp.minimum(positions_BxT, self.max_len - 1)
      x_BxTxD = x_BxTxD + jnp.take(self.position, pos_BxT, axis=0).astype(c.jnp_dtype)
    x_BxTxD = self.drop(x_BxTxD, deterministic=deterministic)
    return constrain(x_BxTxD, "batch", "length", "embed")

  def step(self, token_B, t):
    """The embedding of one token at position t, [B, D]."""
    b = token_B.shape[0]
    return self(token_B[:, None], jnp.full((b, 1), t, jnp.int32))[:, 0]


class Head(nn.Module):
  """Final LayerNorm and projection to vocabulary logits (in float32)."""

  vocab_size: int
  cfg: BlockConfig

  def setup(self):
    self.ln_final = layer_norm(self.cfg.jnp_dtype)
    self.logits = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                           kernel_init=kernel_init(self.cfg, ("embed", "vocab")))

  def __call__(self, x_BxTxD):
    logits_BxTxV = over_tokens(self.logits, self.ln_final(x_BxTxD))
    if logits_BxTxV.ndim == 3:
      logits_BxTxV = constrain(logits_BxTxV, "batch", "length", "vocab")
    return logits_BxTxV
