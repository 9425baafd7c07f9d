"""Incremental decoding with caches at every scale (DESIGN.md section 2).

A decoder turns a trained model's parameters into a pure `step(state, token,
t) -> (state, logits)` that adds fine position `t` and returns the logits
predicting `t + 1`, reading everything earlier from `state`:

* every self-attention block keeps its keys and values (a KV cache) at its
  own scale;
* a coarse position is computed the moment its group of fine positions is
  complete (coarse index g at scale s pools the group ending at fine g k^s),
  and its states are cached for the fine positions that use them;
* cross-scale attention (the bottom-up aggregation layer) caches keys and
  values of every scale as they appear;
* retina pools keys/values level by level as blocks of k^s tokens complete.

Everything runs on fixed-capacity buffers, so `step` compiles once. The
computations mirror the full forward pass (`hiertx.models`), which tests
compare it with at every position.

A prompt does not need P steps: `prefill` runs the full forward pass once,
in parallel, and builds the same state from what it records (each stack's
output and each block's normalised input).
"""

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import hourglass as hourglass_lib
from hiertx.models import retina as retina_lib

_LN_EPS = 1e-6  # flax.linen.LayerNorm's default


# ----------------------------------------------------------------------------
# One position through the shared pieces.

def _ln(p, x_BxD):
  mean = x_BxD.mean(-1, keepdims=True)
  var = jnp.maximum((x_BxD * x_BxD).mean(-1, keepdims=True) - mean * mean, 0.0)
  return (x_BxD - mean) * jax.lax.rsqrt(var + _LN_EPS) * p["scale"] + p["bias"]


def _mlp(p, x_BxD):
  return _gelu(x_BxD @ p["wi"]["kernel"]) @ p["wo"]["kernel"]


def _gelu(x):
  return jax.nn.gelu(x, approximate=True)  # flax.linen.gelu's default


def _proj(w_DxHxK, x_BxD):
  return jnp.einsum("bd,dhk->bhk", x_BxD, w_DxHxK)


def _rotate(cfg: layers.BlockConfig, x_BxNxHxK, end_N):
  return layers.rotary(x_BxNxHxK, end_N) if cfg.positions == "rotary" else x_BxNxHxK


def _attend_one(cfg, p_attn, h_BxD, q_end, keys_BxNxHxK, values_BxNxHxK, mask_N):
  """The attention output of one query position over cached (rotated) keys."""
  q = _rotate(cfg, _proj(p_attn["query"], h_BxD)[:, None], q_end[None])
  b = h_BxD.shape[0]
  mask_Bx1xN = jnp.broadcast_to(mask_N[None, None, :], (b, 1, mask_N.shape[0]))
  o_Bx1xHxK = layers.attend(q, keys_BxNxHxK, values_BxNxHxK, mask_Bx1xN)
  return jnp.einsum("bhk,hkd->bd", o_Bx1xHxK[:, 0], p_attn["out"])


@flax.struct.dataclass
class KV:
  """Keys (rotated at their end positions) and values of one block, [B, C, H, K]."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def empty(cls, cfg: layers.BlockConfig, batch: int, capacity: int):
    shape = (batch, capacity, cfg.num_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


def _keys_values(cfg, p_attn, h_BxLxD, end_L):
  """Keys (rotated at `end_L`) and values [B, L, H, K] of normalised inputs."""
  k = _rotate(cfg, jnp.einsum("bld,dhk->blhk", h_BxLxD, p_attn["key"]), end_L)
  return k, jnp.einsum("bld,dhk->blhk", h_BxLxD, p_attn["value"])


def _kv_at(cfg, p_attn, kv: KV, h_BxD, idx, end) -> KV:
  """`kv` with slot `idx` set to the keys/values of one normalised input."""
  k, v = _keys_values(cfg, p_attn, h_BxD[:, None], end[None])
  return KV(kv.k.at[:, idx].set(k[:, 0]), kv.v.at[:, idx].set(v[:, 0]))


def _block_step(cfg, p, x_BxD, kv: KV, idx, end, end_C):
  """A self-attention block at one new position `idx` (end position `end`) of its scale."""
  h = _ln(p["ln_attn"], x_BxD)
  kv = _kv_at(cfg, p["attn"], kv, h, idx, end)
  mask_C = jnp.arange(end_C.shape[0]) <= idx
  x_BxD = x_BxD + _attend_one(cfg, p["attn"], h, end, kv.k, kv.v, mask_C)
  return x_BxD + _mlp(p["mlp"], _ln(p["ln_mlp"], x_BxD)), kv


def _stack_step(cfg, blocks, x_BxD, kvs, idx, end, end_C):
  out = []
  for p, kv in zip(blocks, kvs):
    x_BxD, kv = _block_step(cfg, p, x_BxD, kv, idx, end, end_C)
    out.append(kv)
  return x_BxD, out


def stack_blocks(tree) -> list[dict]:
  """A stack's per-block parameters, from scanned (stacked) or unrolled layout."""
  if "blocks" in tree and "block" in tree["blocks"]:
    stacked = tree["blocks"]["block"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]
  if "block" in tree and not any(k.startswith("block_") for k in tree):
    return stack_blocks({"blocks": tree})
  n = sum(k.startswith("block_") for k in tree)
  return [tree[f"block_{i}"] for i in range(n)]


def _members(cache_CxD, g, k, ring: int | None = None):
  """Shifted group g of a cached scale: positions gk-k+1 .. gk, [B, k, D], and
  validity; with `ring`, the cache holds position i in slot i % ring."""
  idx_k = g * k - k + 1 + jnp.arange(k)
  valid_k = idx_k >= 0
  slots_k = jnp.maximum(idx_k, 0) % ring if ring else jnp.maximum(idx_k, 0)
  members = jnp.take(cache_CxD, slots_k, axis=1)
  return members * valid_k[None, :, None].astype(members.dtype), valid_k


def _cross_block(cfg, p, x_BxD, q_end, kv_BxNxD, k_end_N, mask_N):
  """A cross-attention block (own LayerNorm on the keys) at one query."""
  h = _ln(p["ln_attn"], x_BxD)
  keys, values = _keys_values(cfg, p["attn"], _ln(p["ln_kv"], kv_BxNxD), k_end_N)
  x_BxD = x_BxD + _attend_one(cfg, p["attn"], h, q_end, keys, values, mask_N)
  return x_BxD + _mlp(p["mlp"], _ln(p["ln_mlp"], x_BxD))


def _pool(kind, p, cache_BxCxD, g, k, cfg=None, ring=None):
  members_BxkxD, valid_k = _members(cache_BxCxD, g, k, ring)
  mean_BxD = members_BxkxD.sum(1) / valid_k.sum().astype(members_BxkxD.dtype)
  if kind == "mean":
    return mean_BxD
  if kind == "attention":  # the group mean attends to its members (positions 0..k-1)
    return _cross_block(cfg, p["block"], mean_BxD, jnp.int32(k - 1), members_BxkxD,
                        jnp.arange(k, dtype=jnp.int32), valid_k)
  b, _, d = members_BxkxD.shape
  return members_BxkxD.reshape(b, k * d) @ p["proj"]["kernel"]  # linear


def _upsample(kind, p, fine_BxD, z_BxGxD, t, k, cfg=None, up_kv=None, t_end=None,
              coarse_end_G=None):
  """Fine index t's upsampled coarse input: z[floor(t/k)], per-offset for linear;
  attention reads the cached keys/values of every coarse z ending by `t_end`."""
  z = jnp.take(z_BxGxD, t // k, axis=1)
  if kind == "repeat":
    return fine_BxD + z
  if kind == "attention":
    x = fine_BxD + z
    h = _ln(p["block"]["ln_attn"], x)
    mask_G = (coarse_end_G <= t_end) & (jnp.arange(coarse_end_G.shape[0]) <= t // k)
    x = x + _attend_one(cfg, p["block"]["attn"], h, t_end, up_kv.k, up_kv.v, mask_G)
    return x + _mlp(p["block"]["mlp"], _ln(p["block"]["ln_mlp"], x))
  d = z.shape[-1]
  w_DxkxD = p["proj"]["kernel"].reshape(d, k, d)
  return fine_BxD + jnp.einsum("bd,de->be", z, jnp.take(w_DxkxD, t % k, axis=1))


def _up_kv(cfg, p, up: KV, z_BxD, g, end) -> KV:
  """Appends coarse state g to an attention upsampling block's key/value cache."""
  return _kv_at(cfg, p["block"]["attn"], up, _ln(p["block"]["ln_kv"], z_BxD), g, end)


def _embed(params, model, token_B, t):
  x = jnp.take(params["embed"]["token"], token_B, axis=0)
  if model.positions == "learned":
    x = x + params["embed"]["position"][jnp.minimum(t, model.max_len - 1)]
  return x


def _head(params, model, h_BxD):
  logits = _ln(params["head"]["ln_final"], h_BxD) @ params["head"]["logits"]["kernel"]
  return logits[:, :model.vocab_size].astype(jnp.float32)


def _when(pred, fn, state):
  return jax.lax.cond(pred, fn, lambda s: s, state)


# ----------------------------------------------------------------------------
# Caches from one parallel pass over the prompt. The full forward pass (with
# `capture_intermediates`) yields each stack's output and each block's
# normalised input; keys, values and states are recomputed from those for all
# positions at once. Entries past the prompt are zeroed, so the state equals
# the one token-by-token steps would have built.

def _out(tree):
  """A captured module output."""
  return tree["__call__"][0]


def _count(p: int, factor: int) -> int:
  """Entries a scale of `factor` holds once fine positions 0 .. p-1 are in: g k^s <= p-1."""
  return (p - 1) // factor + 1


def _filled(values_BxLx, capacity: int, count: int):
  """A cache buffer of `capacity` slots holding the first `count` entries of `values`."""
  n = values_BxLx.shape[1]
  keep = (jnp.arange(n) < count).reshape((1, n) + (1,) * (values_BxLx.ndim - 2))
  pad = [(0, 0), (0, capacity - n)] + [(0, 0)] * (values_BxLx.ndim - 2)
  return jnp.pad(values_BxLx * keep.astype(values_BxLx.dtype), pad)


def _kv_cache(cfg, p_attn, h_BxLxD, factor: int, capacity: int, p: int) -> KV:
  """The KV cache of one block at a scale of `factor` from its normalised inputs."""
  k, v = _keys_values(cfg, p_attn, h_BxLxD,
                      jnp.arange(h_BxLxD.shape[1], dtype=jnp.int32) * factor)
  cap, count = capacity // factor, _count(p, factor)
  return KV(_filled(k, cap, count), _filled(v, cap, count))


def _stack_kv(cfg, param_tree, inter_tree, factor: int, capacity: int, p: int) -> list[KV]:
  """KV caches of every block of a stack (none for an empty stack)."""
  return [_kv_cache(cfg, bp["attn"], _out(bi["ln_attn"]), factor, capacity, p)
          for bp, bi in zip(stack_blocks(param_tree or {}), stack_blocks(inter_tree))]


def _cross_kv(cfg, p_block, z_BxGxD, factor: int, capacity: int, p: int) -> KV:
  """Keys/values a cross-attention block reads from coarse states (own LayerNorm)."""
  return _kv_cache(cfg, p_block["attn"], _ln(p_block["ln_kv"], z_BxGxD), factor, capacity, p)


def _captured(module, method: str) -> bool:
  """What the prompt pass records: stack, pooling and embedding outputs, and
  every LayerNorm's output (a block's normalised input)."""
  return method == "__call__" and isinstance(
      module, (flax.linen.LayerNorm, layers.Stack, scales.Pool, layers.Embed))


# ----------------------------------------------------------------------------
# The models.

@dataclasses.dataclass(frozen=True)
class Decoder:
  """`init(batch) -> state`; `step(params, state, token_B, t) -> (state, logits_BxV)`
  adds fine position t; `prefill(params, prompt_BxP) -> (state, logits_BxV)` adds
  positions 0 .. P-1 in one parallel pass (logits predict position P)."""

  capacity: int  # fine positions the caches hold
  init: Callable[[int], Any]
  step: Callable[..., tuple]
  prefill: Callable[..., tuple]


def _ends(capacity, factor):
  return jnp.arange(capacity // factor, dtype=jnp.int32) * factor


def _vanilla(model, capacity):
  cfg = model.block_cfg
  n = model.num_layers
  end_C = _ends(capacity, 1)

  def init(b):
    return {"kv": [KV.empty(cfg, b, capacity) for _ in range(n)]}

  def step(params, state, token_B, t):
    x = _embed(params, model, token_B, t)
    x, kvs = _stack_step(cfg, stack_blocks(params["blocks"]), x, state["kv"], t, t, end_C)
    return {"kv": kvs}, _head(params, model, x)

  def fill(params, inter, p):
    return {"kv": _stack_kv(cfg, params["blocks"], inter["blocks"], 1, capacity, p)}

  return init, step, fill


def _top_down(model, capacity):
  cfg, factors = model.block_cfg, list(model.pool_factors)
  top = len(factors)
  total = [math.prod(factors[:s]) for s in range(top + 1)]  # K_s
  attention_up = model.upsampling == "attention"

  def init(b):
    return {"e": [jnp.zeros((b, capacity // total[s], cfg.d_model)) for s in range(top + 1)],
            "z": [jnp.zeros((b, capacity // total[s], cfg.d_model)) for s in range(top + 1)],
            "kv": [[KV.empty(cfg, b, capacity // total[s]) for _ in range(n)]
                   for s, n in enumerate(model.layers_per_scale)],
            # keys/values of upsample_s over z_{s+1}, for attention upsampling
            "up": [KV.empty(cfg, b, capacity // total[s + 1]) for s in range(top)]
                  if attention_up else []}

  def step(params, state, token_B, t):
    state = dict(state, e=list(state["e"]), z=list(state["z"]), kv=list(state["kv"]),
                 up=list(state["up"]))
    state["e"][0] = state["e"][0].at[:, t].set(_embed(params, model, token_B, t))

    def pooled(s):  # e_s at its new index, from e_{s-1}
      def fn(st):
        g = t // total[s]
        e = _pool(model.pooling, params.get(f"pool_{s}"), st["e"][s - 1], g, factors[s - 1],
                  cfg)
        return dict(st, e=[*st["e"][:s], st["e"][s].at[:, g].set(e), *st["e"][s + 1:]])
      return fn

    def run_scale(s):  # z_s at its new index
      def fn(st):
        g = t // total[s]
        x = jnp.take(st["e"][s], g, axis=1)
        if s < top:
          x = _upsample(model.upsampling, params.get(f"upsample_{s}"), x, st["z"][s + 1], g,
                        factors[s], cfg, st["up"][s] if attention_up else None, g * total[s],
                        _ends(capacity, total[s + 1]))
        x, kvs = _stack_step(cfg, stack_blocks(params[f"scale_{s}"]) if
                             model.layers_per_scale[s] else [], x, st["kv"][s], g,
                             g * total[s], _ends(capacity, total[s]))
        up = list(st["up"])
        if attention_up and s > 0:
          up[s - 1] = _up_kv(cfg, params[f"upsample_{s - 1}"], up[s - 1], x, g, g * total[s])
        return dict(st, z=[*st["z"][:s], st["z"][s].at[:, g].set(x), *st["z"][s + 1:]],
                    kv=[*st["kv"][:s], kvs, *st["kv"][s + 1:]], up=up)
      return fn

    for s in range(1, top + 1):
      state = _when(t % total[s] == 0, pooled(s), state)
    for s in range(top, 0, -1):
      state = _when(t % total[s] == 0, run_scale(s), state)
    state = run_scale(0)(state)
    return state, _head(params, model, jnp.take(state["z"][0], t, axis=1))

  def fill(params, inter, p):
    e = [_out(inter["embed"])] + [_out(inter[f"pool_{s}"]) for s in range(1, top + 1)]
    z = [_out(inter[f"scale_{s}"]) for s in range(top + 1)]
    cap = lambda s: capacity // total[s]  # noqa: E731
    return {"e": [_filled(x, cap(s), _count(p, total[s])) for s, x in enumerate(e)],
            "z": [_filled(x, cap(s), _count(p, total[s])) for s, x in enumerate(z)],
            "kv": [_stack_kv(cfg, params.get(f"scale_{s}"), inter[f"scale_{s}"], total[s],
                             capacity, p) for s in range(top + 1)],
            "up": [_cross_kv(cfg, params[f"upsample_{s}"]["block"], z[s + 1], total[s + 1],
                             capacity, p) for s in range(top)] if attention_up else []}

  return init, step, fill


def _hourglass(model, capacity):
  cfg = model.block_cfg
  pre, post, factors = hourglass_lib.parse_hierarchy(model.hierarchy)
  depth = len(pre) - 1
  attention_up = model.upsampling == "attention"

  def init(b):
    return {"up": [KV.empty(cfg, b, capacity // factors[i + 1]) for i in range(depth)]
                  if attention_up else [],
            "x": [jnp.zeros((b, capacity // f, cfg.d_model)) for f in factors],
            "z": [jnp.zeros((b, capacity // f, cfg.d_model)) for f in factors],
            "pre": [[KV.empty(cfg, b, capacity // f) for _ in range(pre[i])]
                    for i, f in enumerate(factors)],
            "post": [[KV.empty(cfg, b, capacity // factors[i]) for _ in range(post[i])]
                     for i in range(depth)]}

  def set_at(lst, i, value):
    return [*lst[:i], value, *lst[i + 1:]]

  def level(params, i, t):
    """Level i at its new index t // f_i: pre blocks, inner level, post blocks."""
    f = factors[i]
    stack = lambda name, n: stack_blocks(params[name]) if n else []  # noqa: E731

    def fn(st):
      j = t // f
      if i == 0:
        x = st["x0_in"]
      else:
        k = f // factors[i - 1]
        x = _pool(model.pooling, params.get(f"shorten_{i - 1}"), st["x"][i - 1], j, k, cfg)
      x, kvs = _stack_step(cfg, stack(f"pre_{i}", pre[i]), x, st["pre"][i], j, j * f,
                           _ends(capacity, f))
      st = dict(st, x=set_at(st["x"], i, st["x"][i].at[:, j].set(x)),
                pre=set_at(st["pre"], i, kvs))
      if i < depth:
        k_in = factors[i + 1] // f
        st = _when(t % factors[i + 1] == 0, level(params, i + 1, t), st)
        x = _upsample(model.upsampling, params.get(f"upsample_{i}"), x, st["z"][i + 1], j, k_in,
                      cfg, st["up"][i] if attention_up else None, j * f,
                      _ends(capacity, factors[i + 1]))
        x, kvs = _stack_step(cfg, stack(f"post_{i}", post[i]), x, st["post"][i], j, j * f,
                             _ends(capacity, f))
        st = dict(st, post=set_at(st["post"], i, kvs))
      if attention_up and i > 0:  # the level outside reads this output by attention
        st = dict(st, up=set_at(st["up"], i - 1, _up_kv(
            cfg, params[f"upsample_{i - 1}"], st["up"][i - 1], x, j, j * f)))
      return dict(st, z=set_at(st["z"], i, st["z"][i].at[:, j].set(x)))
    return fn

  def step(params, state, token_B, t):
    st = level(params, 0, t)(dict(state, x0_in=_embed(params, model, token_B, t)))
    del st["x0_in"]
    return st, _head(params, model, jnp.take(st["z"][0], t, axis=1))

  def fill(params, inter, p):
    x = [_out(inter[f"pre_{i}"]) for i in range(depth + 1)]
    z = [_out(inter[f"post_{i}"]) for i in range(depth)] + [x[depth]]
    return {"up": [_cross_kv(cfg, params[f"upsample_{i}"]["block"], z[i + 1], factors[i + 1],
                             capacity, p) for i in range(depth)] if attention_up else [],
            "x": [_filled(v, capacity // f, _count(p, f)) for v, f in zip(x, factors)],
            "z": [_filled(v, capacity // f, _count(p, f)) for v, f in zip(z, factors)],
            "pre": [_stack_kv(cfg, params.get(f"pre_{i}"), inter[f"pre_{i}"], f, capacity, p)
                    for i, f in enumerate(factors)],
            "post": [_stack_kv(cfg, params.get(f"post_{i}"), inter[f"post_{i}"], factors[i],
                               capacity, p) for i in range(depth)]}

  return init, step, fill


def _bottom_up(model, capacity):
  cfg, factors = model.block_cfg, list(model.pool_factors)
  top = len(factors)
  total = [math.prod(factors[:s]) for s in range(top + 1)]
  caps = [capacity // total[s] for s in range(top + 1)]
  agg_end = jnp.concatenate([_ends(capacity, total[s]) for s in range(top + 1)])

  def init(b):
    return {"h": [jnp.zeros((b, c, cfg.d_model)) for c in caps],
            "kv": [[KV.empty(cfg, b, caps[s]) for _ in range(n)]
                   for s, n in enumerate(model.layers_per_scale)],
            "agg": [KV.empty(cfg, b, c) for c in caps],
            "post": [KV.empty(cfg, b, capacity) for _ in range(model.post_layers)]}

  def step(params, state, token_B, t):
    agg_p = params["aggregate"]

    def scale(s):
      def fn(st):
        g = t // total[s]
        if s == 0:
          x = _embed(params, model, token_B, t)
        else:
          x = _pool(model.pooling, params.get(f"pool_{s}"), st["h"][s - 1], g, factors[s - 1],
                    cfg)
        x, kvs = _stack_step(cfg, stack_blocks(params[f"scale_{s}"]), x, st["kv"][s], g,
                             g * total[s], _ends(capacity, total[s]))
        # Aggregation keys/values of this scale's new state (scale embedding, own LayerNorm).
        agg = _kv_at(cfg, agg_p["attn"], st["agg"][s],
                     _ln(agg_p["ln_kv"], x + params["scale_embedding"][s]), g, g * total[s])
        return dict(st, h=[*st["h"][:s], st["h"][s].at[:, g].set(x), *st["h"][s + 1:]],
                    kv=[*st["kv"][:s], kvs, *st["kv"][s + 1:]],
                    agg=[*st["agg"][:s], agg, *st["agg"][s + 1:]])
      return fn

    state = scale(0)(dict(state, h=list(state["h"]), kv=list(state["kv"]),
                          agg=list(state["agg"])))
    for s in range(1, top + 1):
      state = _when(t % total[s] == 0, scale(s), state)
    q = jnp.take(state["h"][0], t, axis=1)
    if model.query_adds_coarse:
      for s in range(1, top + 1):
        q = q + jnp.take(state["h"][s], t // total[s], axis=1)
    counts = [t // total[s] for s in range(top + 1)]
    valid = jnp.concatenate([jnp.arange(caps[s]) <= counts[s] for s in range(top + 1)])
    keys = jnp.concatenate([a.k for a in state["agg"]], axis=1)
    values = jnp.concatenate([a.v for a in state["agg"]], axis=1)
    h = _ln(agg_p["ln_attn"], q)
    x = q + _attend_one(cfg, agg_p["attn"], h, t, keys, values, valid & (agg_end <= t))
    x = x + _mlp(agg_p["mlp"], _ln(agg_p["ln_mlp"], x))
    x, kvs = _stack_step(cfg, stack_blocks(params["post"]), x, state["post"], t, t,
                         _ends(capacity, 1))
    return dict(state, post=kvs), _head(params, model, x)

  def fill(params, inter, p):
    h = [_out(inter[f"scale_{s}"]) for s in range(top + 1)]
    agg_p = params["aggregate"]
    return {"h": [_filled(x, caps[s], _count(p, total[s])) for s, x in enumerate(h)],
            "kv": [_stack_kv(cfg, params[f"scale_{s}"], inter[f"scale_{s}"], total[s],
                             capacity, p) for s in range(top + 1)],
            "agg": [_cross_kv(cfg, agg_p, x + params["scale_embedding"][s], total[s],
                              capacity, p) for s, x in enumerate(h)],
            "post": _stack_kv(cfg, params["post"], inter["post"], 1, capacity, p)}

  return init, step, fill


def retina_ring_sizes(k: int, windows, capacity: int) -> list[int]:
  """Slots per level: the window of blocks a query can reach at levels < S
  (its region holds fewer than w_s + k blocks, and the newest block may run
  ahead of the region by w_{s-1}/k + 2), and every block at the coarsest."""
  sizes = []
  for s, w in enumerate(windows):
    ahead = 1 if s == 0 else -(-windows[s - 1] // k) + 2
    sizes.append(min(w + k + ahead, capacity // k ** s))
  return sizes + [capacity // k ** len(windows)]


def _retina(model, capacity):
  """Per block and level, a ring of unrotated keys/values bounded by the window
  (pooling averages them before rotary), with the end position of each slot."""
  cfg, k = model.block_cfg, model.pool_factor
  windows = tuple(model.windows)
  levels = len(windows) + 1
  rings = retina_ring_sizes(k, windows, capacity)
  h, dk = cfg.num_heads, cfg.head_dim

  def init(b):
    return {"kv": [[{"kv": jnp.zeros((b, r, 2 * h * dk)),
                     "end": jnp.full((r,), retina_lib._FAR, jnp.int32)}  # noqa: SLF001
                    for r in rings] for _ in range(model.num_layers)]}

  def unrotated(p_attn, h_BxLxD):
    """Keys and values before rotary (pooling averages them first), [B, L, 2 H K]."""
    kv = jnp.concatenate([jnp.einsum("bld,dhk->blhk", h_BxLxD, p_attn["key"]),
                          jnp.einsum("bld,dhk->blhk", h_BxLxD, p_attn["value"])], -1)
    return kv.reshape(*h_BxLxD.shape[:2], -1)

  def write(level, s, g, value_BxE):
    slot = g % rings[s]
    return {"kv": level["kv"].at[:, slot].set(value_BxE),
            "end": level["end"].at[slot].set(g * k ** s)}

  def attention(p_ret, x_BxD, lv, t):
    p = p_ret["attn"]
    lv = list(lv)
    lv[0] = write(lv[0], 0, t, unrotated(p, x_BxD[:, None])[:, 0])
    for s in range(1, levels):
      def pool(lvs, s=s):
        g = t // k ** s
        mean = _pool("mean", None, lvs[s - 1]["kv"], g, k, ring=rings[s - 1])
        return [*lvs[:s], write(lvs[s], s, g, mean), *lvs[s + 1:]]
      lv = _when(t % k ** s == 0, pool, lv)
    bounds = retina_lib.region_bounds(t[None], k, windows)
    keys, values, masks = [], [], []
    for s in range(levels):
      end = lv[s]["end"]
      kk, vv = jnp.split(lv[s]["kv"].reshape(-1, rings[s], h, 2 * dk), 2, axis=-1)
      keys.append(_rotate(cfg, kk, end))
      values.append(vv)
      inside = end <= bounds[s][0]
      if s < levels - 1:
        inside &= end > bounds[s + 1][0]
      masks.append(inside)
    out = _attend_one(cfg, p, x_BxD, t, jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                      jnp.concatenate(masks))
    return out, lv

  def step(params, state, token_B, t):
    x = _embed(params, model, token_B, t)
    new = []
    blocks = stack_blocks(params) if "blocks" in params else [
        params[f"block_{i}"] for i in range(model.num_layers)]
    for p, lv in zip(blocks, state["kv"]):
      a, lv = attention(p["retina"], _ln(p["ln_attn"], x), lv, t)
      x = x + a
      x = x + _mlp(p["mlp"], _ln(p["ln_mlp"], x))
      new.append(lv)
    return {"kv": new}, _head(params, model, x)

  def ring(level_BxNxE, s, p):
    """The ring of level s after the prompt: slot j holds the newest entry g = j mod r."""
    last = _count(p, k ** s) - 1
    g_r = last - (last - np.arange(rings[s])) % rings[s]
    valid_r = g_r >= 0
    kv = jnp.take(level_BxNxE, np.maximum(g_r, 0), axis=1) * valid_r[None, :, None]
    return {"kv": kv, "end": jnp.asarray(np.where(valid_r, g_r * k ** s, retina_lib._FAR),  # noqa: SLF001
                                         jnp.int32)}

  def fill(params, inter, p):
    state = []
    for bp, bi in zip(stack_blocks(params), stack_blocks(inter)):
      level = unrotated(bp["retina"]["attn"], _out(bi["ln_attn"]))
      grid = scales.fine_scale(jnp.ones(level.shape[:2], jnp.int32))
      block_rings = [ring(level, 0, p)]
      for s in range(1, levels):
        level = scales.mean_pool(level, grid, k)
        grid = scales.coarser(grid, k)
        block_rings.append(ring(level, s, p))
      state.append(block_rings)
    return {"kv": state}

  return init, step, fill


_BUILDERS = {"vanilla": _vanilla, "top_down": _top_down, "hourglass": _hourglass,
             "bottom_up": _bottom_up, "retina": _retina}


def decoder(model, capacity: int, name: str) -> Decoder:
  """A cached decoder for `model` holding up to `capacity` fine positions."""
  if model.positions == "learned" and capacity > model.max_len:
    raise ConfigError("model.max_len", f"learned positions stop at {model.max_len}; cannot "
                      f"decode {capacity} positions (prompt plus new tokens)")
  capacity = -(-capacity // model.length_multiple()) * model.length_multiple()
  init, step, fill = _BUILDERS[name](model, capacity)
  # Inference needs no rematerialisation; it would only wrap what is captured.
  forward = model.clone(remat="none")

  def step_fn(params, state, token_B, t):
    return step(flax.linen.unbox(params), state, token_B, jnp.asarray(t, jnp.int32))

  def prefill(params, prompt_BxP):
    b, p = prompt_BxP.shape
    if not 1 <= p <= capacity:
      raise ValueError(f"a prompt of {p} tokens does not fit a decoder of capacity {capacity}")
    params = flax.linen.unbox(params)
    logits_BxPxV, captured = forward.apply({"params": params}, prompt_BxP,
                                           capture_intermediates=_captured,
                                           mutable=["intermediates"])
    state = fill(params, captured["intermediates"], p)
    # The same buffers (shapes, dtypes) as init, so steps continue from either.
    like = jax.eval_shape(lambda: init(b))
    state = jax.tree_util.tree_map(lambda x, ref: x.astype(ref.dtype), state, like)
    return state, logits_BxPxV[:, -1]

  return Decoder(capacity, init, step_fn, prefill)


def feed(dec: Decoder, params, prompt_BxP):
  """The prompt through `step` one token at a time (the reference for `prefill`):
  (state, logits_PxBxV)."""
  def body(state, inp):
    token_B, t = inp
    return dec.step(params, state, token_B, t)
  p = prompt_BxP.shape[1]
  return jax.lax.scan(body, dec.init(prompt_BxP.shape[0]), (prompt_BxP.T, jnp.arange(p)))
