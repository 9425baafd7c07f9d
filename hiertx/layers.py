"""Transformer pieces shared by every model: embeddings, attention, MLP, blocks.

Shapes are in names: B batch, T/Q/S lengths (queries, keys), D model width,
H heads, K head width, V vocabulary, F feed-forward width.

Parameters and activations carry logical axis names (`batch`, `length`,
`embed`, `mlp`, `heads`, `kv`, `vocab`); `hiertx.sharding` maps them to mesh
axes, so the modules never name devices.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Additive mask value: large enough that exp() underflows to exactly 0 in f32,
# so masked keys get exactly zero weight and exactly zero gradient.
_MASKED = -1e30


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

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)


def constrain(x: jax.Array, *axes: Optional[str]) -> jax.Array:
  """Names the logical axes of an activation for the partitioner."""
  return nn.with_logical_constraint(x, axes)


def _init(axes, init=nn.initializers.lecun_normal()):
  return nn.with_logical_partitioning(init, axes)


def rotary(x_BxLxHxK: jax.Array, pos_L: jax.Array) -> jax.Array:
  """Rotary position embedding at explicit (possibly coarse) positions."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_K2 = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_LxK2 = pos_L.astype(jnp.float32)[:, None] * freq_K2[None, :]
  sin = jnp.sin(angle_LxK2)[None, :, None, :]
  cos = jnp.cos(angle_LxK2)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:2 * half]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], -1)
  return out.astype(x_BxLxHxK.dtype)


def attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxQxS) -> jax.Array:
  """Softmax attention of queries over an arbitrary key set.

  A query whose keys are all masked gets a zero output: e.g. a fine position
  at the start of a packed document, before its document has any complete
  coarse block, must read nothing from a coarse scale (not an average of
  other documents).
  """
  scale = q_BxQxHxK.shape[-1] ** -0.5
  logits_BxHxQxS = jnp.einsum(
      "bqhk,bshk->bhqs", q_BxQxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
  ) * scale
  logits_BxHxQxS = jnp.where(mask_BxQxS[:, None], logits_BxHxQxS, _MASKED)
  weights = jax.nn.softmax(logits_BxHxQxS, axis=-1) * mask_BxQxS[:, None]
  weights = weights.astype(v_BxSxHxK.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", weights, v_BxSxHxK)


class Attention(nn.Module):
  """Multi-head attention from queries to any key set under an explicit mask.

  Positions passed as `q_pos`/`k_pos` are the *end positions* of the vectors
  (DESIGN.md section 2), used by rotary embeddings so coarse keys sit where
  the information they summarise ends.
  """

  cfg: BlockConfig

  def setup(self):
    c = self.cfg
    shape_in, shape_out = (c.d_model, c.num_heads, c.head_dim), (c.num_heads, c.head_dim, c.d_model)
    init_in = _init(("embed", "heads", "kv"), nn.initializers.lecun_normal(0, (1, 2)))
    init_out = _init(("heads", "kv", "embed"), nn.initializers.lecun_normal((0, 1), 2))
    self.wq = self.param("query", init_in, shape_in)
    self.wk = self.param("key", init_in, shape_in)
    self.wv = self.param("value", init_in, shape_in)
    self.wo = self.param("out", init_out, shape_out)

  def _in(self, w_DxHxK, x_BxLxD):
    return jnp.einsum("bld,dhk->blhk", x_BxLxD, w_DxHxK.astype(self.cfg.jnp_dtype))

  def project_q(self, x_BxQxD, pos_Q):
    q = self._in(self.wq, x_BxQxD)
    return rotary(q, pos_Q) if self.cfg.positions == "rotary" else q

  def project_kv(self, x_BxSxD):
    """Keys and values before rotary, so callers may pool them first."""
    return self._in(self.wk, x_BxSxD), self._in(self.wv, x_BxSxD)

  def rotate_k(self, k_BxSxHxK, pos_S):
    return rotary(k_BxSxHxK, pos_S) if self.cfg.positions == "rotary" else k_BxSxHxK

  def output(self, o_BxQxHxK):
    return jnp.einsum("bqhk,hkd->bqd", o_BxQxHxK, self.wo.astype(self.cfg.jnp_dtype))

  def __call__(self, x_BxQxD, kv_BxSxD, mask_BxQxS, q_pos_Q, k_pos_S):
    q = self.project_q(x_BxQxD, q_pos_Q)
    k, v = self.project_kv(kv_BxSxD)
    k = self.rotate_k(k, k_pos_S)
    return self.output(attend(q, k, v, mask_BxQxS))


class Mlp(nn.Module):
  cfg: BlockConfig

  @nn.compact
  def __call__(self, x_BxTxD, deterministic: bool):
    c = self.cfg
    h_BxTxF = nn.Dense(c.mlp_dim, use_bias=False, dtype=c.jnp_dtype,
                       kernel_init=_init(("embed", "mlp")), name="wi")(x_BxTxD)
    h_BxTxF = constrain(nn.gelu(h_BxTxF), "batch", "length", "mlp")
    h_BxTxF = nn.Dropout(c.dropout)(h_BxTxF, deterministic=deterministic)
    return nn.Dense(c.d_model, use_bias=False, dtype=c.jnp_dtype,
                    kernel_init=_init(("mlp", "embed")), name="wo")(h_BxTxF)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=_init(("embed",), nn.initializers.ones),
                      bias_init=_init(("embed",), nn.initializers.zeros))


class Block(nn.Module):
  """Pre-LN transformer block; attends to itself, or to `kv` when given.

  With `kv` (cross-attention between scales, e.g. the aggregation layer or
  attention upsampling) the keys are normalised by their own LayerNorm.
  """

  cfg: BlockConfig

  @nn.compact
  def __call__(self, x_BxQxD, mask_BxQxS, q_pos_Q, kv_BxSxD=None, k_pos_S=None,
               deterministic: bool = True):
    c = self.cfg
    drop = lambda y: nn.Dropout(c.dropout)(y, deterministic=deterministic)  # noqa: E731
    h = layer_norm("ln_attn", c.jnp_dtype)(x_BxQxD)
    if kv_BxSxD is None:
      kv, k_pos_S = h, q_pos_Q
    else:
      kv = layer_norm("ln_kv", c.jnp_dtype)(kv_BxSxD)
    x_BxQxD = x_BxQxD + drop(Attention(c, name="attn")(h, kv, mask_BxQxS, q_pos_Q, k_pos_S))
    x_BxQxD = constrain(x_BxQxD, "batch", "length", "embed")
    h = layer_norm("ln_mlp", c.jnp_dtype)(x_BxQxD)
    x_BxQxD = x_BxQxD + drop(Mlp(c, name="mlp")(h, deterministic))
    return constrain(x_BxQxD, "batch", "length", "embed")


# Rematerialisation: which activations a block keeps for the backward pass.
#   none:  all of them (fastest, most memory)
#   block: only the block's input; everything inside is recomputed
#   dots:  the outputs of matmuls without batch dimensions (projections, MLP)
REMAT_POLICIES = {
    "block": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls, cfg: BlockConfig, deterministic_argnum: int):
  """`module_cls` wrapped per `cfg.remat`; `deterministic_argnum` counts self as 0."""
  if cfg.remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[cfg.remat],
                  static_argnums=(deterministic_argnum,))


class _ScannedBlock(nn.Module):
  """One Block in the (carry, output) form `nn.scan` wants."""

  cfg: BlockConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxTxT, pos_T):
    return Block(self.cfg, name="block")(
        x_BxTxD, mask_BxTxT, pos_T, None, None, self.deterministic), None


def scan_blocks(module_cls, cfg: BlockConfig, num_blocks: int, num_broadcast: int):
  """`module_cls` repeated `num_blocks` times by `nn.scan`, parameters stacked.

  The module maps (x, *broadcast) -> (x, None). One compiled body instead of
  `num_blocks` copies: faster compiles, and with `cfg.remat` the backward pass
  really recomputes per block. (On XLA:CPU, `remat` of an unrolled loop saves
  nothing: the scheduler is free to run the recomputation early. Inside the
  scan's backward loop it cannot.)
  """
  if cfg.remat != "none":
    module_cls = nn.remat(module_cls, policy=REMAT_POLICIES[cfg.remat])
  return nn.scan(module_cls, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * num_broadcast, length=num_blocks,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Stack(nn.Module):
  """`num_blocks` self-attention blocks sharing one mask (one scale's stack).

  With `cfg.scan` the blocks' parameters are stacked on a leading `layers` axis
  and the loop is a `lax.scan`; otherwise each block is its own submodule.
  """

  cfg: BlockConfig
  num_blocks: int

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxTxT, pos_T, deterministic: bool = True):
    if self.num_blocks == 0:
      return x_BxTxD
    if self.cfg.scan:
      blocks = scan_blocks(_ScannedBlock, self.cfg, self.num_blocks, num_broadcast=2)
      x_BxTxD, _ = blocks(self.cfg, deterministic, name="blocks")(x_BxTxD, mask_BxTxT, pos_T)
      return x_BxTxD
    block = remat(Block, self.cfg, deterministic_argnum=6)
    for i in range(self.num_blocks):
      x_BxTxD = block(self.cfg, name=f"block_{i}")(
          x_BxTxD, mask_BxTxT, pos_T, None, None, deterministic)
    return x_BxTxD


class Embed(nn.Module):
  """Token embedding plus learned positions (when configured)."""

  vocab_size: int
  cfg: BlockConfig
  max_len: int

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, deterministic: bool = True):
    c = self.cfg
    table_VxD = self.param("token", _init(("vocab", "embed"), nn.initializers.normal(1.0)),
                           (self.vocab_size, c.d_model))
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(c.jnp_dtype)
    if c.positions == "learned":
      pos_PxD = self.param("position", _init((None, "embed"), nn.initializers.normal(0.02)),
                           (self.max_len, c.d_model))
      x_BxTxD = x_BxTxD + jnp.take(pos_PxD, positions_BxT, axis=0).astype(c.jnp_dtype)
    x_BxTxD = nn.Dropout(c.dropout)(x_BxTxD, deterministic=deterministic)
    return constrain(x_BxTxD, "batch", "length", "embed")


class Head(nn.Module):
  """Final LayerNorm and projection to vocabulary logits (in float32)."""

  vocab_size: int
  cfg: BlockConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    h = layer_norm("ln_final", self.cfg.jnp_dtype)(x_BxTxD)
    logits_BxTxV = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                            kernel_init=_init(("embed", "vocab")), name="logits")(h)
    return constrain(logits_BxTxV, "batch", "length", "vocab")
