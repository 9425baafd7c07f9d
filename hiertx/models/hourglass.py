"""Hourglass (Nawrot et al. 2021, arXiv 2110.13711), the follow-up comparison.

The hierarchy is written in the paper's notation `N@f` (N blocks at total
shortening factor f), outside in and back, e.g. "2@1 8@3 2@1" or
"1@1 2@2 4@4 2@2 1@1". Each level: pre blocks, shifted shortening, the inner
hourglass, upsampling added to the residual, post blocks.
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

  def length_multiple(self) -> int:
    return parse_hierarchy(self.hierarchy)[2][-1]

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    pre, post, factors = parse_hierarchy(self.hierarchy)
    return self._level(x_BxTxD, fine, 0, pre, post, factors, deterministic)

  def _level(self, x_BxLxD, grid: scales.Scale, i, pre, post, factors, deterministic):
    c = self.block_cfg
    same = scales.mask(grid, grid)
    x_BxLxD = layers.Stack(c, pre[i], name=f"pre_{i}")(x_BxLxD, same, grid.end_L, deterministic)
    if i == len(pre) - 1:
      return x_BxLxD
    k = factors[i + 1] // factors[i]
    coarse = scales.coarser(grid, k)
    z = scales.Pool(self.pooling, k, c, name=f"shorten_{i}")(x_BxLxD, grid, deterministic)
    z = self._level(z, coarse, i + 1, pre, post, factors, deterministic)
    x_BxLxD = scales.Upsample(self.upsampling, k, c, name=f"upsample_{i}")(
        x_BxLxD, z, grid, coarse, deterministic)
    return layers.Stack(c, post[i], name=f"post_{i}")(x_BxLxD, same, grid.end_L, deterministic)

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    innermost = parse_hierarchy(cfg["hierarchy"])[2][-1]
    base.check_pooling_fits("model.hierarchy", innermost, seq_len)
    base._choice(cfg, "pooling", scales.POOLINGS)
    base._choice(cfg, "upsampling", scales.UPSAMPLINGS)
