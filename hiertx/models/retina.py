"""Retina LM (Subramanian et al. 2020): every layer sees the recent past finely
and the far past coarsely (DESIGN.md section 3).

For query t the keys are disjoint regions that cover [0, t] exactly once:
  level 0: single tokens in (E_1, t]
  level s: pooled blocks of k^s tokens whose ends lie in (E_{s+1}, E_s]
  level S: pooled blocks of k^S tokens ending at or before E_S (all the rest)
with E_0 = t and E_{s+1} = floor((E_s - w_s k^s) / k^{s+1}) k^{s+1}, so level s
holds at least w_s blocks and every boundary is aligned to the coarser grid.
Blocks are the shifted-pooling groups of `hiertx.scales` (block g at level s
covers ((g-1)k^s, g k^s]); pooled keys/values are averages of the fine ones.

Two implementations with identical masks: `dense` (keys = every level in
full, memory O(T^2)) is the reference; `chunked` gathers, per chunk of
queries, only the key windows that chunk can use, so activation memory grows
near-linearly with T (the coarsest level, T / k^S keys, aside).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base

_FAR = 1 << 30  # end position of window padding: never inside a region


def region_bounds(t_Q: jax.Array, k: int, windows) -> list[jax.Array]:
  """E_0 .. E_S for each query: level s owns key ends in (E_{s+1}, E_s]."""
  bounds = [t_Q]
  for s, w in enumerate(windows):
    step = k ** (s + 1)
    bounds.append(((bounds[-1] - w * k ** s) // step) * step)
  return bounds


def region_mask(query: scales.Scale, key: scales.Scale, bounds, level: int,
                last_level: bool) -> jax.Array:
  """bool [B, Q, S]: keys of `level` inside the query's region, same document."""
  hi_Q = bounds[level]
  inside_QxS = key.end_L[None, :] <= hi_Q[:, None]
  if not last_level:
    inside_QxS &= key.end_L[None, :] > bounds[level + 1][:, None]
  return inside_QxS[None] & (query.seg_BxL[:, :, None] == key.seg_BxL[:, None, :])


@dataclasses.dataclass(frozen=True)
class RetinaSpec:
  """Pooling factor k, windows (w_0, ..., w_{S-1}), query chunk, implementation."""

  k: int
  windows: tuple
  chunk_size: int
  implementation: str


class RetinaAttention(nn.Module):
  cfg: layers.BlockConfig
  spec: RetinaSpec

  @property
  def k(self):
    return self.spec.k

  @property
  def windows(self):
    return self.spec.windows

  @property
  def chunk_size(self):
    return self.spec.chunk_size

  @nn.compact
  def __call__(self, x_BxTxD, fine: scales.Scale):
    attn = layers.Attention(self.cfg, name="attn")
    q = attn.project_q(x_BxTxD, fine.end_L)
    k_BxTxHxK, v_BxTxHxK = attn.project_kv(x_BxTxD)
    b, t, h, dk = k_BxTxHxK.shape
    # Pool fine keys/values level by level: level s index g ends at g k^s.
    kv = jnp.concatenate([k_BxTxHxK, v_BxTxHxK], -1).reshape(b, t, 2 * h * dk)
    levels, grids = [kv], [fine]
    for _ in self.windows:
      levels.append(scales.mean_pool(levels[-1], grids[-1], self.k))
      grids.append(scales.coarser(grids[-1], self.k))
    keys, values = [], []
    for lv, g in zip(levels, grids):
      kk, vv = jnp.split(lv.reshape(b, g.length, h, 2 * dk), 2, axis=-1)
      keys.append(attn.rotate_k(kk, g.end_L))
      values.append(vv)
    if self.spec.implementation == "dense":
      out = self._dense(q, keys, values, fine, grids)
    else:
      out = self._chunked(q, keys, values, fine, grids)
    return attn.output(out)

  def _dense(self, q, keys, values, fine, grids):
    bounds = region_bounds(fine.end_L, self.k, self.windows)
    last = len(grids) - 1
    mask = jnp.concatenate(
        [region_mask(fine, g, bounds, s, s == last) for s, g in enumerate(grids)], axis=-1)
    return layers.attend(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), mask)

  def window_sizes(self) -> list[int]:
    """Keys per level that one chunk of queries can reach (static bound)."""
    c, k, reach, sizes = self.chunk_size, self.k, 0, []
    for s, w in enumerate(self.windows):
      # E_{s+1}(q0) >= q0 - sum_{r<=s} (w_r k^r + k^{r+1} - 1)
      reach += w * k ** s + k ** (s + 1) - 1
      sizes.append(-(-(c - 1 + reach) // k ** s) + 1)
    return sizes

  def _chunked(self, q_BxTxHxK, keys, values, fine, grids):
    b, t, h, dk = q_BxTxHxK.shape
    c = self.chunk_size
    sizes = self.window_sizes()
    last = len(grids) - 1

    def pad(x, n, value):  # pad the length axis (axis 1, or 0 for end_L) by n each side
      widths = [(0, 0)] * x.ndim
      widths[1 if x.ndim > 1 else 0] = (n, n)
      return jnp.pad(x, widths, constant_values=value)

    padded = []
    for s in range(last):
      n = sizes[s]
      padded.append((pad(keys[s], n, 0), pad(values[s], n, 0),
                     pad(grids[s].end_L, n, _FAR), pad(grids[s].seg_BxL, n, -1)))

    def one_chunk(i):
      q0 = i * c
      t_C = q0 + jnp.arange(c, dtype=jnp.int32)
      query = scales.Scale(t_C, jax.lax.dynamic_slice_in_dim(fine.seg_BxL, q0, c, 1))
      q_BxCxHxK = jax.lax.dynamic_slice_in_dim(q_BxTxHxK, q0, c, 1)
      bounds = region_bounds(t_C, self.k, self.windows)
      ks, vs, ms = [], [], []
      for s in range(last):
        kp, vp, endp, segp = padded[s]
        # First key index whose end can lie inside level s's region for q0.
        start = bounds[s + 1][0] // (self.k ** s) + 1 + sizes[s]
        take = lambda x, ax: jax.lax.dynamic_slice_in_dim(x, start, sizes[s], ax)  # noqa: E731
        key = scales.Scale(take(endp, 0), take(segp, 1))
        ks.append(take(kp, 1))
        vs.append(take(vp, 1))
        ms.append(region_mask(query, key, bounds, s, False))
      ks.append(keys[last])
      vs.append(values[last])
      ms.append(region_mask(query, grids[last], bounds, last, True))
      return layers.attend(q_BxCxHxK, jnp.concatenate(ks, 1), jnp.concatenate(vs, 1),
                           jnp.concatenate(ms, -1))

    out_NxBxCxHxK = jax.lax.map(one_chunk, jnp.arange(t // c))
    return out_NxBxCxHxK.transpose(1, 0, 2, 3, 4).reshape(b, t, h, dk)


class RetinaBlock(nn.Module):
  cfg: layers.BlockConfig
  spec: RetinaSpec

  @nn.compact
  def __call__(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    c = self.cfg
    drop = lambda y: nn.Dropout(c.dropout)(y, deterministic=deterministic)  # noqa: E731
    h = layers.layer_norm("ln_attn", c.jnp_dtype)(x_BxTxD)
    x_BxTxD = x_BxTxD + drop(RetinaAttention(c, self.spec, name="retina")(h, fine))
    x_BxTxD = layers.constrain(x_BxTxD, "batch", "length", "embed")
    h = layers.layer_norm("ln_mlp", c.jnp_dtype)(x_BxTxD)
    x_BxTxD = x_BxTxD + drop(layers.Mlp(c, name="mlp")(h, deterministic))
    return layers.constrain(x_BxTxD, "batch", "length", "embed")


class _ScannedRetinaBlock(nn.Module):
  cfg: layers.BlockConfig
  spec: RetinaSpec
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxTxD, fine: scales.Scale):
    return RetinaBlock(self.cfg, self.spec, name="block")(x_BxTxD, fine, self.deterministic), None


IMPLEMENTATIONS = ("chunked", "dense")


class RetinaLM(base.LanguageModel):
  num_layers: int = 4
  pool_factor: int = 4
  windows: tuple = (64, 16)  # w_0 (tokens), w_1 (blocks of k), ...; S = len(windows)
  chunk_size: int = 64
  implementation: str = "chunked"

  def length_multiple(self) -> int:
    m = self.pool_factor ** len(self.windows)
    return math.lcm(m, self.chunk_size) if self.implementation == "chunked" else m

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    spec = RetinaSpec(self.pool_factor, tuple(self.windows), self.chunk_size,
                      self.implementation)
    if self.scan_layers:
      blocks = layers.scan_blocks(_ScannedRetinaBlock, self.block_cfg, self.num_layers,
                                  num_broadcast=1)
      return blocks(self.block_cfg, spec, deterministic, name="blocks")(x_BxTxD, fine)[0]
    block = layers.remat(RetinaBlock, self.block_cfg, deterministic_argnum=3)
    for i in range(self.num_layers):
      x_BxTxD = block(self.block_cfg, spec, name=f"block_{i}")(x_BxTxD, fine, deterministic)
    return x_BxTxD

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base._positive(cfg, "num_layers", "chunk_size")
    if not isinstance(cfg["pool_factor"], int) or cfg["pool_factor"] < 2:
      raise ConfigError("model.pool_factor", f"must be an integer >= 2, got "
                        f"{cfg['pool_factor']!r}")
    if isinstance(cfg["windows"], int) or len(cfg["windows"]) < 1:
      raise ConfigError("model.windows", "must list at least one window (w_0, w_1, ...), "
                        "one per level below the coarsest")
    base.int_list(cfg, "windows", len(cfg["windows"]), minimum=1)
    coarsest = cfg["pool_factor"] ** len(cfg["windows"])
    base.check_pooling_fits("model.windows", coarsest, seq_len)
    base._choice(cfg, "implementation", IMPLEMENTATIONS)
