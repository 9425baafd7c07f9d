"""Retina LM (Subramanian et al. 2020): every layer sees the recent past finely
and the far past coarsely (docs/design.md section 3).

For query t the keys are disjoint regions that cover [0, t] exactly once:
  level 0: single tokens in (E_1, t]
  level s: pooled blocks of k^s tokens whose ends lie in (E_{s+1}, E_s]
  level S: pooled blocks of k^S tokens ending at or before E_S (all the rest)
with E_0 = t and E_{s+1} = floor((E_s - w_s k^s) / k^{s+1}) k^{s+1}, so level s
holds at least w_s blocks and every boundary is aligned to the coarser grid.
Blocks are the shifted-pooling groups of `hiertx.scales` (block g at level s
covers ((g-1)k^s, g k^s]); pooled keys/values are averages of the fine ones.

Two implementations with identical masks: `dense` (keys = every level in
full, one masked score tensor, memory O(T^2)) is the reference; `chunked`
gathers, per chunk of queries, only the key windows of levels 0 .. S-1 that
chunk can use, and reads the coarsest level through the shared attention
function (blockwise by default: the coarsest level is the end rule with
query end E_S), merging the two softmaxes exactly. Its activation memory
grows linearly with T. Under `pallas` each level runs the kernel with its
window as a lower bound; under `splash` all levels are one key set under the
`dense` mask (the kernel skips its all-false blocks).

Decoding state (docs/design.md section 5): per block and level a ring of
unrotated keys/values bounded by the window (pooling averages them before
rotary), with the end position of each slot; only the coarsest level grows.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from hiertx import attention
from hiertx import layers
from hiertx import scales
from hiertx import workload
from hiertx.errors import ConfigError
from hiertx.models import base


def region_bounds(t_Q, k: int, windows) -> list:
  """E_0 .. E_S for each query: level s owns key ends in (E_{s+1}, E_s].
  Static (numpy) for numpy positions, traced for traced ones."""
  bounds = [t_Q]
  for s, w in enumerate(windows):
    step = k ** (s + 1)
    bounds.append(((bounds[-1] - w * k ** s) // step) * step)
  return bounds


def region_mask(q_seg_BxQ, key_end_S, key_seg_BxS, bounds, level: int,
                last_level: bool) -> jax.Array:
  """bool [B, Q, S]: keys of `level` inside the query's region, same document."""
  hi_Q = bounds[level]
  inside_QxS = key_end_S[None, :] <= hi_Q[:, None]
  if not last_level:
    inside_QxS &= key_end_S[None, :] > bounds[level + 1][:, None]
  return inside_QxS[None] & (q_seg_BxQ[:, :, None] == key_seg_BxS[:, None, :])


def levels_mask(length: int, k: int, windows) -> np.ndarray:
  """bool [T, sum_s T/k^s]: which pooled block of which level each query reads
  (documents aside), levels concatenated finest first. What `dense` uses."""
  t = np.arange(length)
  bounds = region_bounds(t, k, windows)
  out = []
  for s in range(len(windows) + 1):
    end = np.arange(length // k ** s) * k ** s
    inside = end[None, :] <= bounds[s][:, None]
    if s < len(windows):
      inside &= end[None, :] > bounds[s + 1][:, None]
    out.append(inside)
  return np.concatenate(out, axis=1)


def ring_sizes(k: int, windows, capacity: int) -> list[int]:
  """Decoding slots per level: the window of blocks a query can reach at
  levels < S (its region holds fewer than w_s + k blocks, and the newest block
  may run ahead of the region by w_{s-1}/k + 2), and every block at the coarsest."""
  sizes = []
  for s, w in enumerate(windows):
    ahead = 1 if s == 0 else -(-windows[s - 1] // k) + 2
    sizes.append(min(w + k + ahead, capacity // k ** s))
  return sizes + [capacity // k ** len(windows)]


def window_sizes(spec: "RetinaSpec") -> list[int]:
  """Keys per level < S that one chunk of queries can reach (static bound)."""
  c, k, reach, sizes = spec.chunk_size, spec.k, 0, []
  for s, w in enumerate(spec.windows):
    # E_{s+1}(q0) >= q0 - sum_{r<=s} (w_r k^r + k^{r+1} - 1)
    reach += w * k ** s + k ** (s + 1) - 1
    sizes.append(-(-(c - 1 + reach) // k ** s) + 1)
  return sizes


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

  def setup(self):
    self.attn = layers.Attention(self.cfg)

  def _unrotated(self, x_BxLxD):
    """Keys and values before rotary, side by side: [B, L, 2 H K]."""
    k, v = self.attn.project_kv(x_BxLxD)
    return jnp.concatenate([k, v], -1).reshape(*x_BxLxD.shape[:2], -1)

  def _split(self, kv_BxLxE, end_L):
    """Rotated keys and values [B, L, H, K] of one level."""
    b, n = kv_BxLxE.shape[:2]
    kk, vv = jnp.split(kv_BxLxE.reshape(b, n, self.cfg.num_heads, -1), 2, axis=-1)
    return self.attn.rotate_k(kk, end_L), vv

  def __call__(self, x_BxTxD, fine: scales.Scale):
    k, windows = self.spec.k, self.spec.windows
    q = self.attn.project_q(x_BxTxD, fine.rotary_pos)
    # Pool fine keys/values level by level: level s index g ends at g k^s.
    levels, grids = [self._unrotated(x_BxTxD)], [fine]
    for _ in windows:
      levels.append(scales.mean_pool(levels[-1], grids[-1], k))
      grids.append(scales.coarser(grids[-1], k))
    layers.remember(self, "levels", levels)
    kvs = [self._split(lv, g.rotary_pos) for lv, g in zip(levels, grids)]
    site, cfg = layers.site_name(self), self.cfg.attention
    keys = sum(g.length for g in grids)
    chunked = self.spec.implementation == "chunked"
    # Under `pallas` each level is the end rule with a lower bound (the
    # kernel's windows); under `splash` every level is one key set with the
    # static mask `dense` uses (its all-false blocks skipped); cuDNN cannot
    # take the windows: one key set per query chunk, gathered.
    if cfg.kind == "pallas" and chunked:
      why = attention.pallas_refusal(q.shape[-1], None, q.dtype, fine.length, keys, cfg)
    elif cfg.kind == "splash" and chunked:
      why = attention.splash_refusal(np.arange(fine.length), np.arange(keys))
    elif cfg.kind in attention.KERNELS:
      why = ("retina's windows gather their keys per query chunk" if chunked
             else "implementation=dense scores every level in one tensor")
    else:
      why = ""
    kind = (attention.fallback(cfg, site + "/windows", fine.length, keys, why, q.shape[-1])
            if why else cfg.kind)
    if kind == "pallas" and chunked:
      attention.note_site(site + "/windows", fine.length, keys, "pallas", why)
      return self.attn.output(self._levels(q, kvs, fine, grids, site))
    if kind == "splash" and chunked:
      attention.note_site(site + "/windows", fine.length, keys, "splash", why)
      k_all, v_all, seg_all = self._every_level(kvs, grids)
      return self.attn.output(attention.splash_masked(q, k_all, v_all, self._levels_mask(fine),
                                                      fine.seg_BxL, seg_all))
    if self.spec.implementation == "dense":
      attention.note_site(site + "/windows", fine.length, keys, "dense", why)
      out = self._dense(q, kvs, fine, grids)
    else:
      attention.note_site(site + "/windows", fine.length, keys, "chunked dense (lax.map)", why)
      out = self._chunked(q, kvs, fine, grids, site)
    return self.attn.output(out)

  def _levels_mask(self, fine) -> attention.StaticMask:
    k, windows = self.spec.k, self.spec.windows
    return attention.StaticMask(("retina", fine.length, k, windows),
                                lambda: levels_mask(fine.length, k, windows))

  @staticmethod
  def _every_level(kvs, grids):
    """Keys, values and documents of every level, finest first: [B, S, H, K]
    twice and [B, S], S = sum_s T/k^s (the key order of `levels_mask`)."""
    return (jnp.concatenate([k for k, _ in kvs], 1), jnp.concatenate([v for _, v in kvs], 1),
            jnp.concatenate([g.seg_BxL for g in grids], 1))

  def _dense(self, q, kvs, fine, grids):
    k_all, v_all, seg_all = self._every_level(kvs, grids)
    same_doc = fine.seg_BxL[:, :, None] == seg_all[:, None, :]
    return attention.dense(q, k_all, v_all,
                           jnp.asarray(self._levels_mask(fine).build())[None] & same_doc)[0]

  def _levels(self, q_BxTxHxK, kvs, fine, grids, site: str):
    """Every level through the Pallas kernel: level s < S reads key ends in
    (E_{s+1}, E_s], the coarsest ends up to E_S; softmaxes merged exactly."""
    bounds = region_bounds(np.arange(fine.length), self.spec.k, self.spec.windows)
    last = len(self.spec.windows)
    parts = [attention.pallas_attend(q_BxTxHxK, *kvs[s], bounds[s], grids[s].end_L,
                                     fine.seg_BxL, grids[s].seg_BxL, self.cfg.attention,
                                     q_lo=bounds[s + 1]) for s in range(last)]
    parts.append(attention.attend(q_BxTxHxK, *kvs[last], bounds[last], grids[last].end_L,
                                  fine.seg_BxL, grids[last].seg_BxL, self.cfg.attention,
                                  with_lse=True, site=site + "/coarsest"))
    return attention.merge(*parts)[0]

  def _chunked(self, q_BxTxHxK, kvs, fine, grids, site: str):
    b, t, h, dk = q_BxTxHxK.shape
    c, k, windows = self.spec.chunk_size, self.spec.k, self.spec.windows
    sizes = window_sizes(self.spec)
    last = len(windows)

    def pad(x, n, value):  # pad the length axis (axis 1, or 0 for end_L) by n each side
      widths = [(0, 0)] * x.ndim
      widths[1 if x.ndim > 1 else 0] = (n, n)
      return jnp.pad(x, widths, constant_values=value)

    padded = [(pad(kvs[s][0], sizes[s], 0), pad(kvs[s][1], sizes[s], 0),
               pad(jnp.asarray(grids[s].end_L), sizes[s], attention.FAR),
               pad(grids[s].seg_BxL, sizes[s], -1)) for s in range(last)]

    def one_chunk(i):
      q0 = i * c
      t_C = q0 + jnp.arange(c, dtype=jnp.int32)
      q_seg_BxC = jax.lax.dynamic_slice_in_dim(fine.seg_BxL, q0, c, 1)
      bounds = region_bounds(t_C, k, windows)
      ks, vs, ms = [], [], []
      for s in range(last):
        kp, vp, endp, segp = padded[s]
        # First key index whose end can lie inside level s's region for q0.
        start = bounds[s + 1][0] // (k ** s) + 1 + sizes[s]
        take = lambda x, ax: jax.lax.dynamic_slice_in_dim(x, start, sizes[s], ax)
        ks.append(take(kp, 1))
        vs.append(take(vp, 1))
        ms.append(region_mask(q_seg_BxC, take(endp, 0), take(segp, 1), bounds, s, False))
      return attention.dense(jax.lax.dynamic_slice_in_dim(q_BxTxHxK, q0, c, 1),
                             jnp.concatenate(ks, 1), jnp.concatenate(vs, 1),
                             jnp.concatenate(ms, -1))

    # Recomputed in the backward pass, so no chunk's score map is kept.
    o_NxBxCxHxK, lse_NxBxCxH = jax.lax.map(jax.checkpoint(one_chunk), jnp.arange(t // c))
    windowed = (o_NxBxCxHxK.transpose(1, 0, 2, 3, 4).reshape(b, t, h, dk),
                lse_NxBxCxH.transpose(1, 0, 2, 3).reshape(b, t, h))
    # The coarsest level is the end rule with each query's end moved to E_S.
    e_last = region_bounds(np.arange(t), k, windows)[last]
    coarsest = attention.attend(q_BxTxHxK, *kvs[last], e_last, grids[last].end_L,
                                fine.seg_BxL, grids[last].seg_BxL, self.cfg.attention,
                                with_lse=True, site=site + "/coarsest")
    return attention.merge(windowed, coarsest)[0]

  def step(self, h_BxD, rings, t):
    """One decoding position t: its keys/values join the level-0 ring, a block
    completes at level s when k^s divides t, then the query reads every ring."""
    k, windows = self.spec.k, self.spec.windows
    rings = list(rings)
    rings[0] = _write(rings[0], 0, t, k, self._unrotated(h_BxD[:, None])[:, 0])
    for s in range(1, len(windows) + 1):
      def pool(lvs, s=s):
        g = t // k ** s
        slots = lvs[s - 1]["kv"].shape[1]
        mean = scales.masked_mean(*scales.cached_group(lvs[s - 1]["kv"], g, k, slots))[:, 0]
        return base.set_at(lvs, s, _write(lvs[s], s, g, k, mean))
      rings = base.when(t % k ** s == 0, pool, rings)
    bounds = region_bounds(t[None], k, windows)
    keys, values, masks = [], [], []
    for s, ring in enumerate(rings):
      kk, vv = self._split(ring["kv"], ring["end"])
      keys.append(kk)
      values.append(vv)
      inside = ring["end"] <= bounds[s][0]
      if s < len(windows):
        inside &= ring["end"] > bounds[s + 1][0]
      masks.append(inside)
    kv = layers.KV(jnp.concatenate(keys, 1), jnp.concatenate(values, 1))
    return self.attn.over_cache(h_BxD, t, kv, jnp.concatenate(masks)), rings


def _write(ring, s: int, g, k: int, value_BxE):
  slot = g % ring["kv"].shape[1]
  return {"kv": ring["kv"].at[:, slot].set(value_BxE), "end": ring["end"].at[slot].set(g * k ** s)}


class RetinaBlock(layers.PreLN):
  """The shared pre-LN block around retina attention."""

  spec: RetinaSpec

  def setup(self):
    self.setup_residual()
    self.retina = RetinaAttention(self.cfg, self.spec)

  def __call__(self, x_BxTxD, fine: scales.Scale, deterministic: bool = True):
    return self.residual(x_BxTxD, self.retina(self.ln_attn(x_BxTxD), fine), deterministic)

  def step(self, x_BxD, rings, t):
    a, rings = self.retina.step(self.ln_attn(x_BxD), rings, t)
    return self._finish(x_BxD, a), rings


IMPLEMENTATIONS = ("chunked", "dense")


class RetinaLM(base.LanguageModel, layers.Blocks):
  num_layers: int = 4  # blocks, each attending over every level
  pool_factor: int = 4  # k between levels
  windows: tuple = (64, 16)  # w_0 (tokens), w_1 (blocks of k), ...; S = len(windows)
  chunk_size: int = 64  # query chunk of the chunked implementation
  implementation: str = "chunked"  # chunked (near-linear memory) | dense (the reference)

  @property
  def spec(self) -> RetinaSpec:
    return RetinaSpec(self.pool_factor, tuple(self.windows), self.chunk_size,
                      self.implementation)

  def pooling_multiple(self) -> int:
    return self.pool_factor ** len(self.windows)

  def length_multiple(self) -> int:
    m = self.pooling_multiple()
    return math.lcm(m, self.chunk_size) if self.implementation == "chunked" else m

  def setup(self):
    super().setup()
    self.setup_blocks(RetinaBlock, self.block_cfg, self.num_layers, self.spec, step_args=1)

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool, tokens_BxT=None):
    return self.run_blocks(x_BxTxD, fine, deterministic)

  # Decoding -------------------------------------------------------------------

  def init_cache(self, batch, capacity):
    e = 2 * self.d_model
    return {"rings": [{"kv": jnp.zeros((self.num_layers, batch, r, e), self.block_cfg.jnp_dtype),
                       "end": jnp.full((self.num_layers, r), attention.FAR, jnp.int32)}
                      for r in ring_sizes(self.pool_factor, self.windows, capacity)]}

  def step(self, state, token_B, t):
    x, rings = self.step_blocks(self.embed.step(token_B, t), state["rings"], t)
    return {"rings": rings}, self.logits_at(x)

  def prompt_state(self, p, capacity):
    """Slot j of level s's ring holds the newest block g = j (mod ring size)."""
    levels = self.remembered("retina", "levels")  # per level [N, B, T / k^s, 2 H K]
    rings = []
    for s, (level, r) in enumerate(zip(levels, ring_sizes(self.pool_factor, self.windows,
                                                          capacity))):
      last = (p - 1) // self.pool_factor ** s
      g_r = last - (last - np.arange(r)) % r
      valid_r = g_r >= 0
      kv = jnp.take(level, np.maximum(g_r, 0), axis=2) * valid_r[None, None, :, None]
      end = np.where(valid_r, g_r * self.pool_factor ** s, attention.FAR).astype(np.int32)
      rings.append({"kv": kv, "end": jnp.broadcast_to(jnp.asarray(end), (self.num_layers, r))})
    return {"rings": rings}

  # Cost ----------------------------------------------------------------------

  def blocks_at(self, t):
    k, windows = self.pool_factor, tuple(self.windows)
    coarsest_end = np.arange(t // k ** len(windows)) * k ** len(windows)
    if self.implementation == "dense":
      keys = sum(t // k ** s for s in range(len(windows) + 1))
      return [workload.Blocks("blocks", self.num_layers, t, keys, t, t * keys, keys)]
    # Windows: dense per chunk of queries, recomputed in the backward pass;
    # the coarsest level through the configured attention.
    windowed = sum(window_sizes(self.spec))
    e_last = region_bounds(np.arange(t), k, windows)[-1]
    coarse = attention.score_count(e_last, coarsest_end, self.block_cfg.attention)
    # Kept beyond a standard block: the unrotated keys/values (2 D) and the
    # outputs of both parts and their merge (3 D).
    return [workload.Blocks("blocks", self.num_layers, t, windowed + len(coarsest_end), t,
                            t * windowed + coarse, self.map_keys(len(coarsest_end)),
                            t * windowed + self.rescored(coarse), extra_kept=5)]

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base.positive(cfg, "num_layers", "chunk_size")
    if not isinstance(cfg["pool_factor"], int) or cfg["pool_factor"] < 2:
      raise ConfigError("model.pool_factor", f"must be an integer >= 2, got "
                        f"{cfg['pool_factor']!r}")
    if isinstance(cfg["windows"], int) or len(cfg["windows"]) < 1:
      raise ConfigError("model.windows", "must list at least one window (w_0, w_1, ...), "
                        "one per level below the coarsest")
    base.int_list(cfg, "windows", len(cfg["windows"]), minimum=1)
    coarsest = cfg["pool_factor"] ** len(cfg["windows"])
    base.check_pooling_fits("model.windows", coarsest, seq_len)
    base.choice(cfg, "implementation", IMPLEMENTATIONS)
