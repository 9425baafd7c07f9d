"""Hourglass (Nawrot et al. 2021, arXiv 2110.13711), the follow-up comparison.

The hierarchy is written in the paper's notation `N@f` (N blocks at total
shortening factor f), outside in and back, e.g. "2@1 8@3 2@1" or
"1@1 2@2 4@4 2@2 1@1". Each level: pre blocks, shifted shortening, the inner
hourglass, upsampling added to the residual, post blocks.

Decoding state (DESIGN.md section 5), per level i at factor f_i:
  x[i] pre-block outputs, z[i] level outputs   [B, C / f_i, D]
  pre[i], post[i] key/value caches of the level's stacks
  up[i] attention upsampling's keys/values of z[i+1]
Level i gains a position when fine position t is a multiple of f_i.
"""

import re

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base


def parse_hierarchy(spec: str):
  """'2@1 8@3 2@1' -> (pre=[2, 8], post=[2], factors=[1, 3]); validated."""
  field = "model.hierarchy"
  items = spec.split() if isinstance(spec, str) else []
  if not items or not all(re.fullmatch(r"\d+@\d+", it) for it in items):
    raise ConfigError(field, f"{spec!r} is not a list of N@f items like '2@1 8@3 2@1'")
  counts = [int(it.split("@")[0]) for it in items]
  factors = [int(it.split("@")[1]) for it in items]
  if len(items) % 2 == 0 or factors != factors[::-1]:
    raise ConfigError(field, f"{spec!r}: factors must go in and back out symmetrically, "
                      "with one innermost level (e.g. '2@1 8@3 2@1')")
  depth = len(items) // 2
  down = factors[:depth + 1]
  if down[0] != 1:
    raise ConfigError(field, f"{spec!r}: the outermost level must be at factor 1")
  for a, b in zip(down, down[1:]):
    if b <= a or b % a:
      raise ConfigError(field, f"{spec!r}: each inner factor must be a multiple >= 2 of "
                        f"the one outside it ({a} -> {b})")
  if counts[-1] < 1:
    raise ConfigError(field, f"{spec!r}: needs at least one fine block after the last "
                      "upsampling (the last item must be N@1 with N >= 1)")
  return counts[:depth + 1], counts[depth + 1:][::-1], down


class HourglassLM(base.LanguageModel):
  hierarchy: str = "2@1 4@4 2@1"
  pooling: str = "mean"
  upsampling: str = "repeat"

  @property
  def levels(self):
    """(pre block counts, post block counts, factors), outermost first."""
    return parse_hierarchy(self.hierarchy)

  def pooling_multiple(self) -> int:
    return self.levels[2][-1]

  def setup(self):
    super().setup()
    c = self.block_cfg
    pre, post, factors = self.levels
    self.pre = {str(i): layers.Stack(c, n) for i, n in enumerate(pre)}
    self.post = {str(i): layers.Stack(c, n) for i, n in enumerate(post)}
    ks = [b // a for a, b in zip(factors, factors[1:])]
    self.shorten = {str(i): scales.Pool(self.pooling, k, c) for i, k in enumerate(ks)}
    self.upsample = {str(i): scales.Upsample(self.upsampling, k, c) for i, k in enumerate(ks)}

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    return self._level(x_BxTxD, fine, 0, deterministic)

  def _level(self, x_BxLxD, grid: scales.Scale, i: int, deterministic: bool):
    _, post, factors = self.levels
    x_BxLxD = self.pre[str(i)](x_BxLxD, grid, deterministic)
    layers.remember(self, f"x_{i}", x_BxLxD)
    if i < len(post):
      k = factors[i + 1] // factors[i]
      z = self.shorten[str(i)](x_BxLxD, grid, deterministic)
      z = self._level(z, scales.coarser(grid, k), i + 1, deterministic)
      z = self.perturb(f"coarse_{i + 1}", z)  # tests: gradients w.r.t. coarse states
      x_BxLxD = self.upsample[str(i)](x_BxLxD, z, grid, scales.coarser(grid, k), deterministic)
      x_BxLxD = self.post[str(i)](x_BxLxD, grid, deterministic)
    layers.remember(self, f"z_{i}", x_BxLxD)
    return x_BxLxD

  # Decoding -------------------------------------------------------------------

  def init_cache(self, batch, capacity):
    pre, post, factors = self.levels
    slots = [capacity // f for f in factors]
    c = self.block_cfg
    return {"x": [self.hidden(batch, n) for n in slots],
            "z": [self.hidden(batch, n) for n in slots],
            "pre": [layers.KV.empty(c, n, batch, slots[i]) for i, n in enumerate(pre)],
            "post": [layers.KV.empty(c, n, batch, slots[i]) for i, n in enumerate(post)],
            "up": [layers.KV.empty(c, batch, slots[i + 1]) for i in range(len(post))]
                  if self.upsampling == "attention" else []}

  def _step_level(self, i: int, t, x0_BxD):
    """Level i at its new index t // f_i: pre blocks, the inner level (when its
    group completes), upsampling, post blocks."""
    _, post, factors = self.levels
    f = factors[i]

    def fn(st):
      j = t // f
      x = x0_BxD if i == 0 else self.shorten[str(i - 1)].step(st["x"][i - 1], j)
      x, kv = self.pre[str(i)].step(x, st["pre"][i], j, j * f)
      st = dict(st, x=base.set_at(st["x"], i, st["x"][i].at[:, j].set(x)),
                pre=base.set_at(st["pre"], i, kv))
      if i < len(post):
        st = base.when(t % factors[i + 1] == 0, self._step_level(i + 1, t, x0_BxD), st)
        coarse_end = base.ends(st["z"][i + 1].shape[1], factors[i + 1])
        x = self.upsample[str(i)].step(x, st["z"][i + 1], j, j * f,
                                       st["up"][i] if st["up"] else None, coarse_end)
        x, kv = self.post[str(i)].step(x, st["post"][i], j, j * f)
        st = dict(st, post=base.set_at(st["post"], i, kv))
      if st["up"] and i > 0:  # the level outside reads this output by attention
        up = st["up"][i - 1].set(j, self.upsample[str(i - 1)].coarse_keys(x, j * f))
        st = dict(st, up=base.set_at(st["up"], i - 1, up))
      return dict(st, z=base.set_at(st["z"], i, st["z"][i].at[:, j].set(x)))
    return fn

  def step(self, state, token_B, t):
    state = {k: list(v) for k, v in state.items()}
    state = self._step_level(0, t, self.embed.step(token_B, t))(state)
    return state, self.logits_at(state["z"][0][:, t])

  def prompt_state(self, p, capacity):
    sown = self.variables[layers.DECODE]
    pre, post, factors = self.levels
    slots = [capacity // f for f in factors]
    counts = [(p - 1) // f + 1 for f in factors]
    return {"x": [layers.filled(sown[f"x_{i}"], slots[i], counts[i]) for i in range(len(pre))],
            "z": [layers.filled(sown[f"z_{i}"], slots[i], counts[i]) for i in range(len(pre))],
            "pre": [self.pre[str(i)].prompt_cache(slots[i], counts[i]) for i in range(len(pre))],
            "post": [self.post[str(i)].prompt_cache(slots[i], counts[i])
                     for i in range(len(post))],
            "up": [self.upsample[str(i)].block.prompt_keys(slots[i + 1], counts[i + 1])
                   for i in range(len(post))] if self.upsampling == "attention" else []}

  # Cost ----------------------------------------------------------------------

  def blocks_at(self, t):
    pre, post, factors = self.levels
    out = []
    for i, f in enumerate(factors):
      out.append(self.self_attention(f"pre_{i}", pre[i], t // f, f))
      if i < len(post):
        out.append(self.self_attention(f"post_{i}", post[i], t // f, f))
        out += self.scale_change(i, factors[i + 1] // f, t // f, f, self.pooling,
                                 self.upsampling)
    return out

  def extra_params(self):
    _, _, factors = self.levels
    d = self.d_model
    linear = (self.pooling == "linear") + (self.upsampling == "linear")
    return sum(b // a * d * d * linear for a, b in zip(factors, factors[1:]))

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    innermost = parse_hierarchy(cfg["hierarchy"])[2][-1]
    base.check_pooling_fits("model.hierarchy", innermost, seq_len)
    base.choice(cfg, "pooling", scales.POOLINGS)
    base.choice(cfg, "upsampling", scales.UPSAMPLINGS)
