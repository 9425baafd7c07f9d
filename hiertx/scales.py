"""Multi-scale primitives shared by every hierarchical model (docs/design.md sec. 2).

A sequence at scale s is described by a `Scale`: for each of its vectors the
fine position where the information it summarises *ends*, and the document
(segment) it belongs to. Everything causal follows from one rule:

  a query may use a key iff  key.end <= query.end  and both share a segment.

Shifted pooling makes coarse index g pool fine positions gk-k+1 .. gk, so it
ends at gk; upsampling hands coarse index floor(t/k) to fine position t.
Segments make packed rows safe: a coarse vector belongs to the document of its
end position and pools only members of that document.

End positions are static (numpy, known when a function is traced): they are
determined by the shapes and pooling factors alone. That is what lets
blockwise attention skip the chunk pairs the rule forbids.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiertx import layers


@flax.struct.dataclass
class Scale:
  """Where each vector of one scale ends, and which document it belongs to.

  `spans` lists runs of vectors as (count, factor, offset): `count` vectors
  ending at offset, offset + factor, offset + 2 factor, ... A scale made by
  pooling has one span; the key set of the bottom-up aggregation layer has one
  per scale. Spans are static (not traced), so `end_L` is a numpy array.
  """

  seg_BxL: jax.Array  # int32 [B, L], document id (0 is packing padding)
  spans: tuple = flax.struct.field(pytree_node=False)
  # int32 [B, L]: each vector's end as a position within its document (rotary
  # embeddings use it, so a document's attention is the same wherever it sits
  # in a packed row); None: the end positions themselves.
  pos_BxL: jax.Array | None = None
  # int32 [B, L]: the ends of a content-grouped scale (hiertx.boundaries), which
  # differ per row and are only known at run time. Its `spans` are then the
  # vectors' order (0, 1, 2, ...): ends increase along a row, so within the
  # scale "end <= query's end" is "index <= query's index", a static rule.
  end_BxL: jax.Array | None = None

  @property
  def end_L(self) -> np.ndarray:
    return np.concatenate([offset + np.arange(n, dtype=np.int32) * f
                           for n, f, offset in self.spans]).astype(np.int32)

  @property
  def rotary_pos(self):
    """Positions rotary embeddings use: within-document ends, or the ends."""
    return self.end_L if self.pos_BxL is None else self.pos_BxL

  @property
  def length(self) -> int:
    return sum(n for n, _, _ in self.spans)

  @property
  def factor(self) -> int:
    """The pooling factor of a single-span scale (1 for tokens)."""
    if len(self.spans) != 1:
      raise ValueError("a concatenation of scales has no single factor")
    return self.spans[0][1]


def fine_scale(seg_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> Scale:
  """Tokens: vector t ends at t; `positions` are positions within documents."""
  return Scale(seg_BxT, ((seg_BxT.shape[1], 1, 0),), positions_BxT)


def coarser(scale: Scale, k: int) -> Scale:
  """The scale made by shifted pooling with factor k: index g ends where gk does."""
  if scale.length % k:
    raise ValueError(f"length {scale.length} is not a multiple of pooling factor {k}")
  (n, f, offset), = scale.spans
  pos = None if scale.pos_BxL is None else scale.pos_BxL[:, ::k]
  return Scale(scale.seg_BxL[:, ::k], ((n // k, f * k, offset),), pos)


def concat_scales(*scales: Scale) -> Scale:
  pos = (None if any(s.pos_BxL is None for s in scales)
         else jnp.concatenate([s.pos_BxL for s in scales], axis=1))
  return Scale(jnp.concatenate([s.seg_BxL for s in scales], axis=1),
               sum((s.spans for s in scales), ()), pos)


def mask(query: Scale, key: Scale) -> jax.Array:
  """bool [B, Q, S]: the between-scales causal rule plus document separation."""
  causal_QxS = key.end_L[None, :] <= query.end_L[:, None]
  same_doc_BxQxS = query.seg_BxL[:, :, None] == key.seg_BxL[:, None, :]
  return causal_QxS[None] & same_doc_BxQxS


def pad_to_multiple(x_BxT: jax.Array, multiple: int, value=0) -> jax.Array:
  """Right-pads the length axis; padding only adds future positions."""
  extra = -x_BxT.shape[1] % multiple
  return jnp.pad(x_BxT, ((0, 0), (0, extra)), constant_values=value)


def shifted_groups(x_BxLxD: jax.Array, scale: Scale, k: int):
  """Groups for shifted pooling: group g holds positions gk-k+1 .. gk.

  Returns members [B, G, k, D] and valid [B, G, k]: a member is valid when it
  is not left padding and shares the document of the group's end position.
  """
  b, length, d = x_BxLxD.shape
  g = length // k
  x_pad = jnp.pad(x_BxLxD, ((0, 0), (k - 1, 0), (0, 0)))[:, :length]
  seg_pad = jnp.pad(scale.seg_BxL, ((0, 0), (k - 1, 0)), constant_values=-1)[:, :length]
  members_BxGxkxD = x_pad.reshape(b, g, k, d)
  valid_BxGxk = seg_pad.reshape(b, g, k) == scale.seg_BxL[:, ::k, None]
  return members_BxGxkxD, valid_BxGxk


def cached_group(cache_BxCxD: jax.Array, g, k: int, ring: int | None = None):
  """Group g (positions gk-k+1 .. gk) of a decoding cache holding one scale:
  members [B, 1, k, D] and valid [B, 1, k] (left padding is invalid). With
  `ring`, the cache holds position i in slot i % ring."""
  idx_k = g * k - k + 1 + jnp.arange(k)
  valid_k = idx_k >= 0
  slots_k = jnp.maximum(idx_k, 0) % ring if ring else jnp.maximum(idx_k, 0)
  members_BxkxD = jnp.take(cache_BxCxD, slots_k, axis=1)
  members_BxkxD = members_BxkxD * valid_k[None, :, None].astype(members_BxkxD.dtype)
  valid_Bx1xk = jnp.broadcast_to(valid_k, (members_BxkxD.shape[0], 1, k))
  return members_BxkxD[:, None], valid_Bx1xk


def masked_mean(members_BxGxkxD, valid_BxGxk) -> jax.Array:
  w = valid_BxGxk[..., None].astype(members_BxGxkxD.dtype)
  # The end member is always valid, so the count is at least one.
  return (members_BxGxkxD * w).sum(2) / w.sum(2)


def mean_pool(x_BxLxD: jax.Array, scale: Scale, k: int) -> jax.Array:
  """Shifted average pooling over the valid members of each group -> [B, L/k, D]."""
  return masked_mean(*shifted_groups(x_BxLxD, scale, k))


def upsample_repeat(z_BxGxD: jax.Array, coarse: Scale, fine: Scale, k: int) -> jax.Array:
  """Fine position t receives coarse index floor(t/k), if from its own document."""
  up_BxLxD = jnp.repeat(z_BxGxD, k, axis=1)[:, :fine.length]
  same_doc = jnp.repeat(coarse.seg_BxL, k, axis=1)[:, :fine.length] == fine.seg_BxL
  return up_BxLxD * same_doc[..., None].astype(z_BxGxD.dtype)


def upsample_latest(z_BxGxD, latest_BxT, coarse: Scale, fine: Scale, null_D=None) -> jax.Array:
  """Content groups: fine position t receives coarse index latest[t] (the last
  group closed at or before t; -1: none yet), if from its own document; a
  position before its document's first group receives `null_D` (DTP's null
  group's coarse output), or zero without one."""
  idx_BxT = jnp.maximum(latest_BxT, 0)
  z_BxTxD = jnp.take_along_axis(z_BxGxD, idx_BxT[..., None], axis=1)
  same_doc = ((jnp.take_along_axis(coarse.seg_BxL, idx_BxT, axis=1) == fine.seg_BxL)
              & (latest_BxT >= 0))
  return _or_null(z_BxTxD, same_doc, null_D)


def _or_null(z_NxD, has_N, null_D):
  """z where `has`, else the null group's output (zero without one)."""
  if null_D is None:
    return z_NxD * has_N[..., None].astype(z_NxD.dtype)
  return jnp.where(has_N[..., None], z_NxD, null_D.astype(z_NxD.dtype))


POOLINGS = ("mean", "linear", "attention")
UPSAMPLINGS = ("repeat", "linear", "attention")


class Pool(nn.Module):
  """Shifted pooling by factor k: mean, linear (concat + project) or attention.

  Attention pooling (Hourglass, Nawrot et al. 2021) lets the group mean
  attend to the group's members, followed by a feed-forward layer. The forward
  pass and a decoding step share `group`, which pools prepared groups.
  """

  kind: str
  k: int
  cfg: layers.BlockConfig

  def setup(self):
    if self.kind == "linear":
      self.proj = nn.Dense(self.cfg.d_model, use_bias=False, dtype=self.cfg.jnp_dtype,
                           kernel_init=layers.kernel_init(self.cfg, ("mlp", "embed")))
    elif self.kind == "attention":
      self.block = layers.Block(self.cfg, cross=True)
    elif self.kind != "mean":
      raise ValueError(f"unknown pooling {self.kind!r}; expected one of {POOLINGS}")

  def __call__(self, x_BxLxD, scale: Scale, deterministic: bool = True):
    """[B, L, D] -> [B, L/k, D]."""
    return self.group(*shifted_groups(x_BxLxD, scale, self.k), deterministic)

  def group(self, members_BxGxkxD, valid_BxGxk, deterministic: bool = True):
    """Pools each group of k members (invalid members are ignored) -> [B, G, D]."""
    mean_BxGxD = masked_mean(members_BxGxkxD, valid_BxGxk)
    if self.kind == "mean":
      return mean_BxGxD
    b, g, k, d = members_BxGxkxD.shape
    if self.kind == "linear":
      valid = valid_BxGxk[..., None].astype(members_BxGxkxD.dtype)
      return layers.over_tokens(self.proj, (members_BxGxkxD * valid).reshape(b, g, k * d))
    # attention: the mean (at the group's end, k-1) reads the members (0 .. k-1)
    # of its own group; invalid members sit in another "document".
    query = Scale(jnp.ones((b * g, 1), jnp.int32), ((1, 1, k - 1),))
    keys = Scale(valid_BxGxk.reshape(b * g, k).astype(jnp.int32), ((k, 1, 0),))
    out = self.block.attend_to(mean_BxGxD.reshape(b * g, 1, d), query,
                           members_BxGxkxD.reshape(b * g, k, d), keys, deterministic)
    return out.reshape(b, g, d)

  def step(self, cache_BxCxD, g, ring: int | None = None):
    """Decoding: group g of a cached finer scale, pooled -> [B, D]."""
    return self.group(*cached_group(cache_BxCxD, g, self.k, ring))[:, 0]


class Upsample(nn.Module):
  """Merges a coarse sequence into a fine residual stream.

  repeat:    fine + z[floor(t/k)]
  linear:    fine + W_r z[floor(t/k)], a separate projection per offset r = t mod k
  attention: a block whose queries (fine + repeat) cross-attend to all coarse
             vectors the scale mask allows.
  """

  kind: str
  k: int
  cfg: layers.BlockConfig

  def setup(self):
    if self.kind == "linear":
      self.proj = nn.Dense(self.k * self.cfg.d_model, use_bias=False, dtype=self.cfg.jnp_dtype,
                           kernel_init=layers.kernel_init(self.cfg, ("embed", "mlp")))
    elif self.kind == "attention":
      self.block = layers.Block(self.cfg, cross=True)
    elif self.kind != "repeat":
      raise ValueError(f"unknown upsampling {self.kind!r}; expected one of {UPSAMPLINGS}")

  def __call__(self, fine_BxLxD, z_BxGxD, fine: Scale, coarse: Scale,
               deterministic: bool = True):
    if self.kind == "repeat":
      return fine_BxLxD + upsample_repeat(z_BxGxD, coarse, fine, self.k)
    if self.kind == "linear":
      b, g, d = z_BxGxD.shape
      z_BxLxD = layers.over_tokens(self.proj, z_BxGxD).reshape(b, g * self.k, d)
      per_offset = Scale(jnp.repeat(coarse.seg_BxL, self.k, axis=1), fine.spans, fine.pos_BxL)
      return fine_BxLxD + upsample_repeat(z_BxLxD, per_offset, fine, 1)
    x = fine_BxLxD + upsample_repeat(z_BxGxD, coarse, fine, self.k)
    return self.block.attend_to(x, fine, z_BxGxD, coarse, deterministic)

  def step(self, fine_BxD, z_BxGxD, i, end, coarse_kv: "layers.KV | None" = None,
           coarse_end_G=None):
    """Decoding: fine index i (ending at `end`) of this level, given the cached
    coarse outputs; attention reads `coarse_kv` (keys/values of every cached
    coarse vector, ending at `coarse_end_G`)."""
    z_BxD = jnp.take(z_BxGxD, i // self.k, axis=1)
    if self.kind == "repeat":
      return fine_BxD + z_BxD
    if self.kind == "linear":
      d = z_BxD.shape[-1]
      return fine_BxD + jax.lax.dynamic_slice_in_dim(self.proj(z_BxD), (i % self.k) * d, d, 1)
    return self.block.cross_step(fine_BxD + z_BxD, end, coarse_kv, coarse_end_G)

  def groups(self, fine_BxTxD, z_BxGxD, latest_BxT, fine: Scale, coarse: Scale,
             deterministic: bool = True, weight_BxT=None, null_D=None):
    """Content groups (hiertx.boundaries): fine position t receives group
    latest[t], the last one closed at or before t (before its document's
    first, `null_D` if given), times `weight` if given; attention reads every
    group closed by t (per-row ends, so the dense path)."""
    up_BxTxD = upsample_latest(z_BxGxD, latest_BxT, coarse, fine, null_D)
    if weight_BxT is not None:
      up_BxTxD = up_BxTxD * weight_BxT[..., None].astype(up_BxTxD.dtype)
    x_BxTxD = fine_BxTxD + up_BxTxD
    if self.kind == "repeat":
      return x_BxTxD
    return self.block.attend_to(x_BxTxD, fine, z_BxGxD, coarse, deterministic)

  def step_groups(self, fine_BxD, z_BxGxD, latest_B, end, coarse_kv: "layers.KV | None" = None,
                  null_D=None):
    """Decoding with content groups: fine position `end` reads group latest[b]
    of each row (before the first, `null_D` if given; attention: every cached
    group up to it)."""
    z_BxD = jnp.take_along_axis(z_BxGxD, jnp.maximum(latest_B, 0)[:, None, None], axis=1)[:, 0]
    z_BxD = _or_null(z_BxD, latest_B >= 0, null_D)  # a stream is one document
    if self.kind == "repeat":
      return fine_BxD + z_BxD
    slots = jnp.arange(z_BxGxD.shape[1])
    return self.block.cross_read(fine_BxD + z_BxD, end, coarse_kv, slots <= latest_B[:, None])

  def coarse_keys(self, z_BxD, end) -> "layers.KV":
    """Keys/values of one new coarse vector for the attention cache, [B, 1, H, K]."""
    return self.block.cross_keys(z_BxD[:, None], end[None])
