"""Hourglass (Nawrot et al. 2021, arXiv 2110.13711), the follow-up comparison.

The hierarchy is written in the paper's notation `N@f` (N blocks at total
shortening factor f), outside in and back, e.g. "2@1 8@3 2@1" or
"1@1 2@2 4@4 2@2 1@1". Each level: pre blocks, shifted shortening, the inner
hourglass, upsampling added to the residual, post blocks.

Decoding state (docs/design.md section 5), per level i at factor f_i:
  x[i] pre-block outputs, z[i] level outputs   [B, C / f_i, D]
  pre[i], post[i] key/value caches of the level's stacks
  up[i] attention upsampling's keys/values of z[i+1]
Level i gains a position when fine position t is a multiple of f_i.

Content groups (`boundaries` other than "fixed", hiertx.boundaries) replace the
first shortening's fixed groups: one shortening level ("N@1 M@k N@1", k the
target average group length), mean or attention pooling, repeat or attention
upsampling. Level 1 then gains a position, per row, when a group closes; the
state adds `groups` = [last close position, groups so far, previous token,
previous routing key]. `boundaries="dynamic"` may also chunk twice, as
H-Net's 2-stage model ("N@1 M@k1 L@k1k2 M@k1 N@1": bytes -> chunks -> chunks
of chunks, each stage its own router aiming at 1/k_i); level 2 then gains a
position, per row, when a level-1 chunk closes a level-2 chunk, and the state
adds `groups_1`.
"""

import re

import jax.numpy as jnp

from hiertx import boundaries as boundaries_lib
from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base
from hiertx.models import content_groups


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


class HourglassLM(content_groups.ContentGroupedLM):
  hierarchy: str = "2@1 4@4 2@1"  # N@f items: N blocks at shortening f, in and back out
  pooling: str = "mean"  # shortening: mean | linear | attention (hiertx.scales)
  upsampling: str = "repeat"  # repeat | linear | attention (hiertx.scales)

  @property
  def levels(self):
    """(pre block counts, post block counts, factors), outermost first."""
    return parse_hierarchy(self.hierarchy)

  def pooling_multiple(self) -> int:
    # Content groups start at every document's first byte wherever it sits.
    return 1 if self.content else self.levels[2][-1]

  def content_k(self) -> int:
    return self.levels[2][1]

  @property
  def content_stages(self) -> int:
    """How many shortenings group by content: every one for dynamic (H-Net's
    stages), else the first."""
    if not self.content:
      return 0
    return len(self.levels[2]) - 1 if self.boundaries == "dynamic" else 1

  def content_slots(self, length: int) -> list[int]:
    """Positions per level over `length` bytes: the bytes, then each content
    stage's slots per row."""
    factors = self.levels[2]
    sizes = [length]
    _, capacity = self.close_rules()
    for i in range(self.content_stages):
      sizes.append(boundaries_lib.num_slots(sizes[-1], factors[i + 1] // factors[i], capacity))
    return sizes

  def setup(self):
    super().setup()
    c = self.block_cfg
    pre, post, factors = self.levels
    self.pre = {str(i): layers.Stack(c, n) for i, n in enumerate(pre)}
    self.post = {str(i): layers.Stack(c, n) for i, n in enumerate(post)}
    ks = [b // a for a, b in zip(factors, factors[1:])]
    self.shorten = {str(i): scales.Pool(self.pooling, k, c) for i, k in enumerate(ks)}
    self.upsample = {str(i): scales.Upsample(self.upsampling, k, c) for i, k in enumerate(ks)}
    if self.content:
      self.content_groups = self.content_shortening()
    if self.content_stages > 1:  # H-Net's second stage: chunks of chunks
      self.content_groups_1 = self.content_shortening(stage=1, k=factors[2] // factors[1])

  def _grouping(self, i: int):
    """The content shortening between levels i and i + 1."""
    return self.content_groups if i == 0 else self.content_groups_1

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool, tokens_BxT=None):
    return self._level(x_BxTxD, fine, 0, deterministic, tokens_BxT)

  def _level(self, x_BxLxD, grid: scales.Scale, i: int, deterministic: bool, tokens_BxT=None):
    _, post, factors = self.levels
    x_BxLxD = self.pre[str(i)](x_BxLxD, grid, deterministic)
    layers.remember(self, f"x_{i}", x_BxLxD)
    if i < len(post):
      content = i < self.content_stages
      if content:
        if tokens_BxT is None:  # a second stage: no bytes to read (dynamic reads states)
          tokens_BxT = jnp.zeros(x_BxLxD.shape[:2], jnp.int32)
        z, coarse, latest_BxT, route = self._grouping(i)(x_BxLxD, grid, tokens_BxT,
                                                         self.shorten[str(i)], deterministic)
        null_D = self._null_output(i, x_BxLxD.dtype, deterministic)
      else:
        z = self.shorten[str(i)](x_BxLxD, grid, deterministic)
        coarse = scales.coarser(grid, factors[i + 1] // factors[i])
      z = self._level(z, coarse, i + 1, deterministic)
      z = self.perturb(f"coarse_{i + 1}", z)  # tests: gradients w.r.t. coarse states
      if content:
        x_BxLxD = self._grouping(i).upsample(self.upsample[str(i)], x_BxLxD, z, latest_BxT,
                                             grid, coarse, route, deterministic, null_D)
      else:
        x_BxLxD = self.upsample[str(i)](x_BxLxD, z, grid, coarse, deterministic)
      x_BxLxD = self.post[str(i)](x_BxLxD, grid, deterministic)
    layers.remember(self, f"z_{i}", x_BxLxD)
    return x_BxLxD

  def _null_output(self, i: int, dtype, deterministic: bool):
    """The content shortening i's null group through level i + 1 (None without one)."""
    return self._grouping(i).null_output(
        lambda x, scale: self._level(x, scale, i + 1, deterministic), dtype)

  # Decoding -------------------------------------------------------------------

  def cache_slots(self, capacity: int) -> list[int]:
    factors = self.levels[2]
    if self.content:
      return self.content_slots(capacity)
    return [capacity // f for f in factors]

  def init_cache(self, batch, capacity):
    pre, post, factors = self.levels
    slots = self.cache_slots(capacity)
    c = self.block_cfg
    groups = boundaries_lib.init_state(batch, self.d_model) if self.content else []
    second = ({"groups_1": boundaries_lib.init_state(batch, self.d_model)}
              if self.content_stages > 1 else {})
    return {"groups": groups, **second, "null": self.null_cache(batch),
            "x": [self.hidden(batch, n) for n in slots],
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
    x0_BxD = self.embed.step(token_B, t)
    if self.content:
      state = self._step_content(state, token_B, t, x0_BxD)
    else:
      state = self._step_level(0, t, x0_BxD)(state)
    return state, self.logits_at(state["z"][0][:, t])

  def _step_content(self, st, token_B, t, x0_BxD):
    """Fine position t with content groups: level-0 pre blocks, the close rules,
    level 1 at the new slot of each row that closes a group (and with two
    stages, level 2 where that slot closes a chunk of chunks), upsampling from
    each row's last closed group, post blocks."""
    set_x = lambda name, lvl, x: base.set_at(
        st[name], lvl, st[name][lvl].at[:, t].set(x))
    x, kv = self.pre["0"].step(x0_BxD, st["pre"][0], t, t)
    st = dict(st, x=set_x("x", 0, x), pre=base.set_at(st["pre"], 0, kv))

    def level(i):
      """Level i >= 1 at each closing row's new slot: (st, its output [B, D])."""
      def run(st, z_BxD, slot_B):
        put = lambda st, name, v: base.set_at(
            st[name], i, layers.set_rows(st[name][i], slot_B, v))
        z, kv = self.pre[str(i)].step(z_BxD, st["pre"][i], slot_B, t)
        st = dict(st, x=put(st, "x", z), pre=base.set_at(st["pre"], i, kv))
        if i < self.content_stages:
          st, z = self._grouping(i).decode_step(
              st, jnp.zeros_like(token_B), z, t, st["x"][i], self.shorten[str(i)], level(i + 1),
              self.upsample[str(i)], index_B=slot_B)
          z, kv = self.post[str(i)].step(z, st["post"][i], slot_B, t)
          st = dict(st, post=base.set_at(st["post"], i, kv))
        return dict(st, z=put(st, "z", z)), z
      return run

    st = self.null_from_start(st, t, lambda: self._null_output(0, x.dtype, True))
    st, x = self.content_groups.decode_step(st, token_B, x, t, st["x"][0], self.shorten["0"],
                                            level(1), self.upsample["0"],
                                            null_D=st["null"][0] if st["null"] else None)
    x, kv = self.post["0"].step(x, st["post"][0], t, t)
    return dict(st, z=set_x("z", 0, x), post=base.set_at(st["post"], 0, kv))

  def prompt_state(self, p, capacity):
    sown = self.variables[layers.DECODE]
    pre, post, factors = self.levels
    slots = self.cache_slots(capacity)
    groups = {}
    if self.content:
      # Each content level holds each row's groups so far (per-row counts).
      counts = [p]
      for i in range(self.content_stages):
        state, count_B = self._grouping(i).prompt_state(counts[-1])
        groups["groups" + ("_1" if i else "")] = state
        counts.append(count_B)
    else:
      counts = [(p - 1) // f + 1 for f in factors]
      groups = {"groups": []}

    def z(i):
      if 0 < i <= self.content_stages:  # the smoothed outputs the level outside reads
        return self._grouping(i - 1).prompt_coarse(sown[f"z_{i}"])
      return sown[f"z_{i}"]

    state = {**groups,
             "x": [layers.filled(sown[f"x_{i}"], slots[i], counts[i]) for i in range(len(pre))],
             "z": [layers.filled(z(i), slots[i], counts[i]) for i in range(len(pre))],
             "pre": [self.pre[str(i)].prompt_cache(slots[i], counts[i]) for i in range(len(pre))],
             "post": [self.post[str(i)].prompt_cache(slots[i], counts[i])
                      for i in range(len(post))],
             "up": [self.upsample[str(i)].block.prompt_keys(slots[i + 1], counts[i + 1])
                    for i in range(len(post))] if self.upsampling == "attention" else []}
    batch = state["x"][0].shape[0]
    return dict(state, null=self.prompt_null(batch, lambda: self._null_output(
        0, state["x"][0].dtype, True)))

  # Cost ----------------------------------------------------------------------

  def blocks_at(self, t):
    pre, post, factors = self.levels
    if self.content:
      return self._content_blocks_at(t)
    out = []
    for i, f in enumerate(factors):
      out.append(self.self_attention(f"pre_{i}", pre[i], t // f, f))
      if i < len(post):
        out.append(self.self_attention(f"post_{i}", post[i], t // f, f))
        out += self.scale_change(i, factors[i + 1] // f, t // f, f, self.pooling,
                                 self.upsampling)
    return out

  def _content_blocks_at(self, t):
    pre, post, _ = self.levels
    sizes = self.content_slots(t)
    out = [self.self_attention(f"pre_{i}", pre[i], sizes[i], 1) for i in range(len(pre))]
    out += [self.self_attention(f"post_{i}", post[i], sizes[i], 1) for i in range(len(post))]
    return out + self.content_scale_change(t)

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
    if cfg["boundaries"] != "fixed":
      _, _, factors = parse_hierarchy(cfg["hierarchy"])
      stages = len(factors) - 1
      if cfg["boundaries"] == "dynamic" and stages == 2 and cfg["dynamic_rules"]:
        raise ConfigError("model.dynamic_rules", "two dynamic stages (H-Net's 2-stage model) "
                          "run without the close rules; set model.dynamic_rules=False")
      if stages != 1 and not (cfg["boundaries"] == "dynamic" and stages == 2):
        raise ConfigError("model.hierarchy", f"{cfg['hierarchy']!r}: boundaries="
                          f"{cfg['boundaries']!r} groups the first shortening by content and "
                          "supports one shortening level (e.g. '2@1 4@4 2@1'); 'dynamic' "
                          "also two, as H-Net's 2-stage model (e.g. '1@1 1@2 4@8 1@2 1@1')")
      for a, b in zip(factors, factors[1:]):
        content_groups.check_content_groups(cfg, b // a)
