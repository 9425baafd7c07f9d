"""Top-down multi-scale LM (Subramanian et al. 2020): coarse to fine.

  e_0 = embed(x),  e_s = Pool_k(e_{s-1})
  z_S = Blocks_S(e_S);  z_s = Blocks_s(Up_k(e_s, z_{s+1}))  for s = S-1 .. 0
Up is repeat, per-offset linear, or cross-attention under the scale mask.
Blocks_0 needs at least one block: it is the only place the tokens a coarse
state is stale on can be seen.

Decoding state (docs/design.md section 5), per scale s with K_s = prod(k[:s]):
  e[s]  pooled embeddings, z[s] stack outputs   [B, C / K_s, D]
  kv[s] the stack's key/value caches            [N_s, B, C / K_s, H, K]
  up[s] attention upsampling's keys/values of z[s+1]
Scale s gains a position when fine position t is a multiple of K_s.

Content groups (`boundaries` other than "fixed", hiertx.boundaries) replace the
fixed groups of a single pooling (`pool_factors=(k,)`, k the target mean group
length); the boundary source reads the embeddings being pooled (so `entropy`
is a next-byte head on one byte's embedding: a bigram model). Scale 1 then
gains a position, per row, when a group closes; the state adds `groups`.
"""

import math

from hiertx import boundaries as boundaries_lib
from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base
from hiertx.models import content_groups


class TopDownLM(base.PooledScales, content_groups.ContentGroupedLM):
  layers_per_scale: tuple = (2, 2, 2)  # scale 0 (fine) .. S
  pool_factors: tuple = (4, 4)  # k between scale s-1 and s, s = 1..S
  pooling: str = "mean"  # mean | linear | attention (hiertx.scales)
  upsampling: str = "repeat"  # coarser output into the finer stack: repeat | linear | attention

  def pooling_multiple(self) -> int:
    # Content groups start at every document's first byte wherever it sits.
    return 1 if self.content else math.prod(self.pool_factors)

  def content_k(self) -> int:
    return self.pool_factors[0]

  def setup(self):
    super().setup()
    c = self.block_cfg
    self.pool = {str(s): scales.Pool(self.pooling, k, c)
                 for s, k in enumerate(self.pool_factors, start=1)}
    self.scale = {str(s): layers.Stack(c, n) for s, n in enumerate(self.layers_per_scale)}
    self.upsample = {str(s): scales.Upsample(self.upsampling, k, c)
                     for s, k in enumerate(self.pool_factors)}
    if self.content:
      self.content_groups = self.content_shortening()

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool, tokens_BxT=None):
    embeds, grid = [x_BxTxD], [fine]
    if self.content:  # one pooling, by content
      e, coarse, latest_BxT, route = self.content_groups(x_BxTxD, fine, tokens_BxT,
                                                         self.pool["1"], deterministic)
      embeds.append(e)
      grid.append(coarse)
    else:
      for s, k in enumerate(self.pool_factors, start=1):
        embeds.append(self.pool[str(s)](embeds[-1], grid[-1], deterministic))
        grid.append(scales.coarser(grid[-1], k))
    z = null_D = None
    if self.content:  # before scale 1's own pass, whose keys a decoder's prompt keeps
      null_D = self._null_output(x_BxTxD.dtype, deterministic)
    for s in range(self.top, -1, -1):
      x = embeds[s]
      if s < self.top and self.content:
        x = self.content_groups.upsample(self.upsample["0"], x, z, latest_BxT, fine, grid[1],
                                         route, deterministic, null_D)
      elif s < self.top:
        x = self.upsample[str(s)](x, z, grid[s], grid[s + 1], deterministic)
      z = self.scale[str(s)](x, grid[s], deterministic)
      if s:
        z = self.perturb(f"coarse_{s}", z)  # tests: gradients w.r.t. coarse states
      layers.remember(self, f"e_{s}", embeds[s])
      layers.remember(self, f"z_{s}", z)
    return z

  def _null_output(self, dtype, deterministic: bool):
    """The content groups' null group through scale 1 (None without one)."""
    return self.content_groups.null_output(
        lambda x, scale: self.scale["1"](x, scale, deterministic), dtype)

  # Decoding -------------------------------------------------------------------

  def cache_slots(self, capacity: int) -> list[int]:
    if self.content:
      return [capacity, self.slots(capacity)]
    return [capacity // self.factor(s) for s in range(self.top + 1)]

  def init_cache(self, batch, capacity):
    slots = self.cache_slots(capacity)
    attention_up = self.upsampling == "attention"
    return {"groups": boundaries_lib.init_state(batch, self.d_model) if self.content else [],
            "null": self.null_cache(batch),
            "e": [self.hidden(batch, n) for n in slots],
            "z": [self.hidden(batch, n) for n in slots],
            "kv": [layers.KV.empty(self.block_cfg, n, batch, slots[s])
                   for s, n in enumerate(self.layers_per_scale)],
            "up": [layers.KV.empty(self.block_cfg, batch, slots[s + 1])
                   for s in range(self.top)] if attention_up else []}

  def step(self, state, token_B, t):
    state = {k: list(v) for k, v in state.items()}
    state["e"][0] = state["e"][0].at[:, t].set(self.embed.step(token_B, t))
    if self.content:
      state = self._step_content(state, token_B, t)
      return state, self.logits_at(state["z"][0][:, t])

    def pooled(s):  # e_s at its new index, from e_{s-1}
      def fn(st):
        g = t // self.factor(s)
        e = self.pool[str(s)].step(st["e"][s - 1], g)
        return dict(st, e=base.set_at(st["e"], s, st["e"][s].at[:, g].set(e)))
      return fn

    def run_scale(s):  # z_s at its new index
      def fn(st):
        g, end = t // self.factor(s), (t // self.factor(s)) * self.factor(s)
        x = st["e"][s][:, g]
        if s < self.top:
          coarse_end = base.ends(st["z"][s + 1].shape[1], self.factor(s + 1))
          x = self.upsample[str(s)].step(x, st["z"][s + 1], g, end,
                                         st["up"][s] if st["up"] else None, coarse_end)
        x, kv = self.scale[str(s)].step(x, st["kv"][s], g, end)
        st = dict(st, z=base.set_at(st["z"], s, st["z"][s].at[:, g].set(x)),
                  kv=base.set_at(st["kv"], s, kv))
        if st["up"] and s > 0:  # the scale below reads z_s by attention
          up = st["up"][s - 1].set(g, self.upsample[str(s - 1)].coarse_keys(x, end))
          st = dict(st, up=base.set_at(st["up"], s - 1, up))
        return st
      return fn

    for s in range(1, self.top + 1):
      state = base.when(t % self.factor(s) == 0, pooled(s), state)
    for s in range(self.top, 0, -1):
      state = base.when(t % self.factor(s) == 0, run_scale(s), state)
    state = run_scale(0)(state)
    return state, self.logits_at(state["z"][0][:, t])

  def _step_content(self, st, token_B, t):
    """Fine position t with content groups: the close rules, scale 1 at the new
    slot of each row that closes a group, then scale 0 reading each row's last
    closed group."""
    e_BxD = st["e"][0][:, t]

    def coarse(st, z_BxD, slot_B):
      put = lambda name, x: base.set_at(
          st[name], 1, layers.set_rows(st[name][1], slot_B, x))
      x, kv = self.scale["1"].step(z_BxD, st["kv"][1], slot_B, t)
      return dict(st, e=put("e", z_BxD), z=put("z", x), kv=base.set_at(st["kv"], 1, kv)), x

    st = self.null_from_start(st, t, lambda: self._null_output(e_BxD.dtype, True))
    st, x = self.content_groups.decode_step(st, token_B, e_BxD, t, st["e"][0], self.pool["1"],
                                            coarse, self.upsample["0"],
                                            null_D=st["null"][0] if st["null"] else None)
    x, kv = self.scale["0"].step(x, st["kv"][0], t, t)
    return dict(st, z=base.set_at(st["z"], 0, st["z"][0].at[:, t].set(x)),
                kv=base.set_at(st["kv"], 0, kv))

  def prompt_state(self, p, capacity):
    sown = self.variables[layers.DECODE]
    slots = self.cache_slots(capacity)
    if self.content:
      groups, count_B = self.content_groups.prompt_state(p)
      counts = [p, count_B]
    else:
      groups = []
      counts = [(p - 1) // self.factor(s) + 1 for s in range(self.top + 1)]
    state = {
        "groups": groups,
        "e": [layers.filled(sown[f"e_{s}"], slots[s], counts[s]) for s in range(self.top + 1)],
        "z": [layers.filled(self.content_groups.prompt_coarse(sown[f"z_{s}"])
                            if self.content and s == 1 else sown[f"z_{s}"], slots[s], counts[s])
              for s in range(self.top + 1)],
        "kv": [self.scale[str(s)].prompt_cache(slots[s], counts[s])
               for s in range(self.top + 1)],
        "up": [self.upsample[str(s)].block.prompt_keys(slots[s + 1], counts[s + 1])
               for s in range(self.top)] if self.upsampling == "attention" else []}
    e = state["e"][0]
    return dict(state, null=self.prompt_null(e.shape[0], lambda: self._null_output(
        e.dtype, True)))

  # Cost ----------------------------------------------------------------------

  def blocks_at(self, t):
    if self.content:
      return [self.self_attention("scale_0", self.layers_per_scale[0], t, 1),
              self.self_attention("scale_1", self.layers_per_scale[1], self.slots(t), 1),
              *self.content_scale_change(t)]
    lengths = [t // self.factor(s) for s in range(self.top + 1)]
    out = [self.self_attention(f"scale_{s}", n, lengths[s], self.factor(s))
           for s, n in enumerate(self.layers_per_scale)]
    for s, k in enumerate(self.pool_factors):
      out += self.scale_change(s, k, lengths[s], self.factor(s), self.pooling,
                               self.upsampling)
    return out

  def extra_params(self):
    d = self.d_model
    return sum(k * d * d * ((self.pooling == "linear") + (self.upsampling == "linear"))
               for k in self.pool_factors)

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    factors = cls.check_factors(cfg, seq_len)
    n = len(factors)
    per_scale = base.int_list(cfg, "layers_per_scale", n + 1, minimum=0)
    if per_scale[0] < 1:
      raise ConfigError("model.layers_per_scale", "scale 0 needs at least one block after "
                        "the last upsampling: coarse states are stale by up to k^s - 1 "
                        f"tokens and only fine blocks can see them (got {per_scale})")
    base.choice(cfg, "pooling", scales.POOLINGS)
    base.choice(cfg, "upsampling", scales.UPSAMPLINGS)
    if cfg["boundaries"] != "fixed":
      if n != 1:
        raise ConfigError("model.pool_factors", f"{factors}: boundaries={cfg['boundaries']!r} "
                          "groups one pooling by content; give one factor, e.g. (4,), and "
                          "two entries of model.layers_per_scale")
      content_groups.check_content_groups(cfg, factors[0])

