"""Multi-scale primitives shared by every hierarchical model (DESIGN.md sec. 2).

A sequence at scale s is described by a `Scale`: for each of its vectors the
fine position where the information it summarises *ends*, and the document
(segment) it belongs to. Everything causal follows from one rule:

  a query may use a key iff  key.end <= query.end  and both share a segment.

Shifted pooling makes coarse index g pool fine positions gk-k+1 .. gk, so it
ends at gk; upsampling hands coarse index floor(t/k) to fine position t.
Segments make packed rows safe: a coarse vector belongs to the document of its
end position and pools only members of that document.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiertx import layers


class Scale(NamedTuple):
  """Where each vector of one scale ends, and which document it belongs to."""

  end_L: jax.Array  # int32 [L], fine position of the vector's last input
  seg_BxL: jax.Array  # int32 [B, L], document id (0 is packing padding)

  @property
  def length(self) -> int:
    return self.end_L.shape[0]


def fine_scale(seg_BxT: jax.Array) -> Scale:
  return Scale(jnp.arange(seg_BxT.shape[1], dtype=jnp.int32), seg_BxT)


def coarser(scale: Scale, k: int) -> Scale:
  """The scale made by shifted pooling with factor k: index g ends where gk does."""
  if scale.length % k:
    raise ValueError(f"length {scale.length} is not a multiple of pooling factor {k}")
  return Scale(scale.end_L[::k], scale.seg_BxL[:, ::k])


def concat_scales(*scales: Scale) -> Scale:
  return Scale(jnp.concatenate([s.end_L for s in scales]),
               jnp.concatenate([s.seg_BxL for s in scales], axis=1))


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


def _masked_mean(members_BxGxkxD, valid_BxGxk) -> jax.Array:
  w = valid_BxGxk[..., None].astype(members_BxGxkxD.dtype)
  # The end member is always valid, so the count is at least one.
  return (members_BxGxkxD * w).sum(2) / w.sum(2)


def mean_pool(x_BxLxD: jax.Array, scale: Scale, k: int) -> jax.Array:
  """Shifted average pooling over the valid members of each group -> [B, L/k, D]."""
  return _masked_mean(*shifted_groups(x_BxLxD, scale, k))


def upsample_repeat(z_BxGxD: jax.Array, coarse: Scale, fine: Scale, k: int) -> jax.Array:
  """Fine position t receives coarse index floor(t/k), if from its own document."""
  up_BxLxD = jnp.repeat(z_BxGxD, k, axis=1)[:, :fine.length]
  same_doc = jnp.repeat(coarse.seg_BxL, k, axis=1)[:, :fine.length] == fine.seg_BxL
  return up_BxLxD * same_doc[..., None].astype(z_BxGxD.dtype)


POOLINGS = ("mean", "linear", "attention")
UPSAMPLINGS = ("repeat", "linear", "attention")


class Pool(nn.Module):
  """Shifted pooling by factor k: mean, linear (concat + project) or attention.

  Attention pooling (Hourglass, Nawrot et al. 2021) lets the group mean
  attend to the group's members, followed by a feed-forward layer.
  """

  kind: str
  k: int
  cfg: layers.BlockConfig

  @nn.compact
  def __call__(self, x_BxLxD, scale: Scale, deterministic: bool = True):
    members, valid = shifted_groups(x_BxLxD, scale, self.k)
    mean_BxGxD = _masked_mean(members, valid)
    if self.kind == "mean":
      return mean_BxGxD
    b, g, k, d = members.shape
    if self.kind == "linear":
      flat_BxGxkD = (members * valid[..., None]).reshape(b, g, k * d)
      return nn.Dense(d, use_bias=False, dtype=self.cfg.jnp_dtype, name="proj",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), ("mlp", "embed")))(flat_BxGxkD)
    if self.kind == "attention":
      q_NxD = mean_BxGxD.reshape(b * g, 1, d)
      kv_NxkxD = members.reshape(b * g, k, d)
      mask_Nx1xk = valid.reshape(b * g, 1, k)
      out = layers.Block(self.cfg, name="block")(
          q_NxD, mask_Nx1xk, jnp.array([k - 1]), kv_BxSxD=kv_NxkxD,
          k_pos_S=jnp.arange(k), deterministic=deterministic)
      return out.reshape(b, g, d)
    raise ValueError(f"unknown pooling {self.kind!r}; expected one of {POOLINGS}")


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

  @nn.compact
  def __call__(self, fine_BxLxD, z_BxGxD, fine: Scale, coarse: Scale,
               deterministic: bool = True):
    if self.kind == "repeat":
      return fine_BxLxD + upsample_repeat(z_BxGxD, coarse, fine, self.k)
    if self.kind == "linear":
      b, g, d = z_BxGxD.shape
      proj = nn.Dense(self.k * d, use_bias=False, dtype=self.cfg.jnp_dtype, name="proj",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), ("embed", "mlp")))
      z_BxLxD = proj(z_BxGxD).reshape(b, g * self.k, d)
      return fine_BxLxD + upsample_repeat(z_BxLxD, coarse_segments_at_fine(coarse, fine), fine, 1)
    if self.kind == "attention":
      x = fine_BxLxD + upsample_repeat(z_BxGxD, coarse, fine, self.k)
      return layers.Block(self.cfg, name="block")(
          x, mask(fine, coarse), fine.end_L, kv_BxSxD=z_BxGxD, k_pos_S=coarse.end_L,
          deterministic=deterministic)
    raise ValueError(f"unknown upsampling {self.kind!r}; expected one of {UPSAMPLINGS}")


def coarse_segments_at_fine(coarse: Scale, fine: Scale) -> Scale:
  """The coarse segments repeated to fine length (for per-offset upsampling)."""
  k = fine.length // coarse.length
  return Scale(fine.end_L, jnp.repeat(coarse.seg_BxL, k, axis=1))
