"""Bottom-up multi-scale LM (Subramanian et al. 2020): fine to coarse, one
global upsampling through an aggregation layer (docs/design.md section 3).

  h_0 = Blocks_0(embed(x));  h_s = Blocks_s(Pool_k(h_{s-1}))  for s = 1..S
  aggregation: fine queries attend to [h_0; h_1 + e_1; ...; h_S + e_S]
               (e_s a learned scale embedding) under the scale mask, then FFN
  post: M >= 1 fine blocks, which see the tokens coarse states are stale on.

Decoding state (docs/design.md section 5), per scale s with K_s = prod(k[:s]):
  h[s]   stack outputs                              [B, C / K_s, D]
  kv[s]  the stack's key/value caches
  agg[s] the aggregation layer's keys/values of h[s] + e_s
  post   the post blocks' key/value caches
"""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base


class BottomUpLM(base.PooledScales, base.LanguageModel):
  layers_per_scale: tuple = (2, 2, 2)  # scale 0 (fine) .. S
  pool_factors: tuple = (4, 4)  # k between scale s-1 and s, s = 1..S
  pooling: str = "mean"  # mean | linear | attention (hiertx.scales)
  post_layers: int = 1  # fine blocks after the aggregation
  query_adds_coarse: bool = False  # aggregation queries add repeated coarse states

  def pooling_multiple(self) -> int:
    return math.prod(self.pool_factors)

  def setup(self):
    super().setup()
    c = self.block_cfg
    self.scale = {str(s): layers.Stack(c, n) for s, n in enumerate(self.layers_per_scale)}
    self.pool = {str(s): scales.Pool(self.pooling, k, c)
                 for s, k in enumerate(self.pool_factors, start=1)}
    self.scale_embedding = self.param(
        "scale_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (self.top + 1, self.d_model))
    self.aggregate = layers.Block(c, cross=True)
    self.post = layers.Stack(c, self.post_layers)

  def _tagged(self, h_BxLxD, s: int):
    """States of scale s as aggregation keys: plus the scale's embedding."""
    return h_BxLxD + self.scale_embedding[s].astype(h_BxLxD.dtype)

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool, tokens_BxT=None):
    h = self.scale["0"](x_BxTxD, fine, deterministic)
    states, grid = [h], [fine]
    for s, k in enumerate(self.pool_factors, start=1):
      coarse = scales.coarser(grid[-1], k)
      h = self.pool[str(s)](h, grid[-1], deterministic)
      h = self.scale[str(s)](h, coarse, deterministic)
      h = self.perturb(f"coarse_{s}", h)  # tests: gradients w.r.t. coarse states
      states.append(h)
      grid.append(coarse)
    for s, h in enumerate(states):
      layers.remember(self, f"h_{s}", h)
    kv_BxNxD = jnp.concatenate([self._tagged(h, s) for s, h in enumerate(states)], axis=1)
    q_BxTxD = states[0]
    if self.query_adds_coarse:
      for s in range(1, len(states)):
        q_BxTxD = q_BxTxD + scales.upsample_repeat(states[s], grid[s], fine, self.factor(s))
    x_BxTxD = self.aggregate.attend_to(q_BxTxD, fine, kv_BxNxD, scales.concat_scales(*grid),
                                   deterministic)
    return self.post(x_BxTxD, fine, deterministic)

  # Decoding -------------------------------------------------------------------

  def init_cache(self, batch, capacity):
    slots = [capacity // self.factor(s) for s in range(self.top + 1)]
    c = self.block_cfg
    return {"h": [self.hidden(batch, n) for n in slots],
            "kv": [layers.KV.empty(c, n, batch, slots[s])
                   for s, n in enumerate(self.layers_per_scale)],
            "agg": [layers.KV.empty(c, batch, n) for n in slots],
            "post": layers.KV.empty(c, self.post_layers, batch, capacity)}

  def step(self, state, token_B, t):
    state = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}

    def scale(s):
      def fn(st):
        g = t // self.factor(s)
        end = g * self.factor(s)
        x = (self.embed.step(token_B, t) if s == 0
             else self.pool[str(s)].step(st["h"][s - 1], g))
        x, kv = self.scale[str(s)].step(x, st["kv"][s], g, end)
        agg = st["agg"][s].set(g, self.aggregate.cross_keys(self._tagged(x, s)[:, None],
                                                            end[None]))
        return dict(st, h=base.set_at(st["h"], s, st["h"][s].at[:, g].set(x)),
                    kv=base.set_at(st["kv"], s, kv), agg=base.set_at(st["agg"], s, agg))
      return fn

    state = scale(0)(state)
    for s in range(1, self.top + 1):
      state = base.when(t % self.factor(s) == 0, scale(s), state)
    q = state["h"][0][:, t]
    if self.query_adds_coarse:
      for s in range(1, self.top + 1):
        q = q + state["h"][s][:, t // self.factor(s)]
    keys = layers.KV(jnp.concatenate([a.k for a in state["agg"]], axis=1),
                     jnp.concatenate([a.v for a in state["agg"]], axis=1))
    key_end = np.concatenate([base.ends(a.k.shape[1], self.factor(s))
                              for s, a in enumerate(state["agg"])])
    x = self.aggregate.cross_step(q, t, keys, key_end)
    x, post = self.post.step(x, state["post"], t, t)
    return dict(state, post=post), self.logits_at(x)

  def prompt_state(self, p, capacity):
    sown = self.variables[layers.DECODE]
    slots = [capacity // self.factor(s) for s in range(self.top + 1)]
    counts = [(p - 1) // self.factor(s) + 1 for s in range(self.top + 1)]
    # The aggregation layer read every scale's keys as one concatenation.
    agg = sown["aggregate"]["kv"]
    offsets = np.cumsum([0] + [sown[f"h_{s}"].shape[1] for s in range(self.top + 1)])
    return {"h": [layers.filled(sown[f"h_{s}"], slots[s], counts[s])
                  for s in range(self.top + 1)],
            "kv": [self.scale[str(s)].prompt_cache(slots[s], counts[s])
                   for s in range(self.top + 1)],
            "agg": [layers.KV(agg.k[:, a:b], agg.v[:, a:b]).filled(slots[s], counts[s])
                    for s, (a, b) in enumerate(zip(offsets, offsets[1:]))],
            "post": self.post.prompt_cache(capacity, p)}

  # Cost ----------------------------------------------------------------------

  def blocks_at(self, t):
    lengths = [t // self.factor(s) for s in range(self.top + 1)]
    out = [self.self_attention(f"scale_{s}", n, lengths[s], self.factor(s))
           for s, n in enumerate(self.layers_per_scale)]
    for s, k in enumerate(self.pool_factors):
      out += self.scale_change(s, k, lengths[s], self.factor(s), self.pooling, None)
    key_end = np.concatenate([np.arange(n) * self.factor(s) for s, n in enumerate(lengths)])
    out.append(self.cross_attention("aggregate", np.arange(t), key_end))
    out.append(self.self_attention("post", self.post_layers, t, 1))
    return out

  def extra_params(self):
    d = self.d_model
    pool = sum(k * d * d for k in self.pool_factors) if self.pooling == "linear" else 0
    return pool + (self.top + 1) * d  # scale embeddings

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    n = len(cls.check_factors(cfg, seq_len))
    base.int_list(cfg, "layers_per_scale", n + 1, minimum=1)
    base.choice(cfg, "pooling", scales.POOLINGS)
    if not isinstance(cfg["post_layers"], int) or cfg["post_layers"] < 1:
      raise ConfigError("model.post_layers", "needs at least one fine block after the "
                        "aggregation layer: coarse states are up to k^s - 1 tokens stale "
                        f"and only fine blocks can see that gap (got {cfg['post_layers']})")


