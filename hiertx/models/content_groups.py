"""Models whose first shortening may group by content (hiertx.boundaries):
the content-group fields, the close rules and their checks.

Only the models that can use them carry these fields (hourglass and top_down
derive from `ContentGroupedLM`), so `config.model` of the others does not
show them and setting one there is refused in one line.
"""

import jax.numpy as jnp

from hiertx import boundaries as boundaries_lib
from hiertx import workload as workload_lib
from hiertx.errors import ConfigError
from hiertx.models import base

class ContentGroupedLM(base.LanguageModel):
  """A LanguageModel whose first shortening by k groups by `boundaries`:
  at most `max_group` bytes per group, slots per row = group_capacity * T / k."""

  # Where groups of the first shortening end: every k bytes (`fixed`) or by
  # content (hiertx.boundaries; docs/models.md, "Content-dependent shortening").
  boundaries: str = "fixed"  # fixed | whitespace | entropy | learned | dynamic
  max_group: int = 16  # a group closes when it has this many bytes (forced close)
  group_capacity: float = 1.5  # groups a document may have by position pos: capacity (pos + 1) / k
  entropy_threshold: float = 3.0  # bits, boundaries=entropy
  boundary_temperature: float = 1.0  # Gumbel-sigmoid, boundaries=learned (0: no noise)
  boundary_prior_weight: float = 1.0  # binomial prior on the rate 1/k, learned
  # boundaries=learned: the predictor, "layernorm" (LN, d -> d, GELU, -> 1) or
  # "dtp" (Dynamic Token Pooling's d -> mlp_dim, ReLU, -> 1).
  boundary_predictor: str = "layernorm"
  # boundaries=learned: DTP's null group, a learned vector that the coarse
  # level reads alone; positions before their document's first group receive
  # its output (False: they receive nothing, as with the other sources).
  boundary_null_group: bool = True
  # boundaries=learned with noise: evaluation and decoding "sample" the noise
  # as training does (DTP; a fixed draw per document position) or close where
  # the logit is above 0 ("threshold").
  boundary_eval: str = "sample"
  # boundaries=dynamic: what a chunk holds, "boundary" (H-Net: the state at
  # its boundary) or "pool" (its window pooled by model.pooling).
  dynamic_chunk: str = "boundary"
  # boundaries=dynamic: whether max_group and group_capacity apply (H-Net has
  # neither: False, so no close is forced or dropped and a row has T slots).
  dynamic_rules: bool = False
  # boundaries=entropy: the head's loss also trains the states it reads (else
  # it learns from a stop-gradient copy, as BLT trains its entropy model apart).
  entropy_trains_trunk: bool = False
  ratio_loss_weight: float = 0.03  # boundaries=dynamic: H-Net's ratio loss toward 1/k

  @property
  def content(self) -> bool:
    return self.boundaries != "fixed"

  def content_k(self) -> int:
    """The first shortening's factor: content groups' target mean length."""
    raise NotImplementedError

  def content_shortening(self, stage: int = 0, k: int | None = None) -> boundaries_lib.Shortening:
    """A content-grouped shortening (call in `setup`): the first, or H-Net's
    second `stage` aiming at groups of `k`."""
    max_group, capacity = self.close_rules()
    return boundaries_lib.Shortening(
        self.boundaries, k or self.content_k(), self.vocab_size, self.padded_vocab,
        self.block_cfg, max_group, capacity, self.entropy_threshold, self.boundary_temperature,
        self.boundary_prior_weight, self.entropy_trains_trunk, self.ratio_loss_weight,
        self.boundary_predictor, self.dynamic_chunk, stage, self.null_group,
        self.boundary_eval)

  @property
  def null_group(self) -> bool:
    """Whether the content groups have DTP's null group (learned only)."""
    return self.boundaries == "learned" and self.boundary_null_group

  def null_cache(self, batch: int) -> list:
    """The decoding state's "null": the null group's coarse output per row,
    [[B, D]] ([] without one). It depends only on the parameters, so a
    decoder computes it once: at position 0 (`null_from_start`) or after the
    prompt (`prompt_null`), not at every step."""
    return [self.hidden(batch, 1)[:, 0]] if self.null_group else []

  def null_from_start(self, st: dict, t, output) -> dict:
    """`st` with its "null" computed by `output()` ([D]) at position 0."""
    if not self.null_group:
      return st
    fill = lambda st: dict(st, null=[jnp.broadcast_to(output(), st["null"][0].shape)])
    return base.when(t == 0, fill, st)

  def prompt_null(self, batch: int, output) -> list:
    """The "null" of a state after a prompt's pass; call after everything
    else is read from that pass (`output()` runs the coarse level again)."""
    if not self.null_group:
      return []
    return [jnp.broadcast_to(output(), (batch, self.d_model))]

  def close_rules(self) -> tuple[int, float]:
    """(max_group, group_capacity) of the content groups; (0, 0.0), no rule,
    for H-Net's dynamic chunking unless model.dynamic_rules."""
    if self.boundaries == "dynamic" and not self.dynamic_rules:
      return 0, 0.0
    return self.max_group, self.group_capacity

  def slots(self, length: int) -> int:
    """Coarse slots per row of content groups over `length` fine positions."""
    return boundaries_lib.num_slots(length, self.content_k(), self.close_rules()[1])

  def source_params(self) -> int:
    return self.content_stages * boundaries_lib.source_params(
        self.boundaries, self.d_model, self.padded_vocab, self.mlp_dim, self.boundary_predictor,
        self.null_group)

  def content_scale_change(self, t: int) -> list[workload_lib.Blocks]:
    """The attention blocks of a content-grouped first shortening over t
    positions: `slots(t)` groups in row order; attention pooling reads a
    window of `max_group` per group; attention upsampling has per-row ends, so
    it runs dense (every fine query against every slot, its map kept)."""
    g, m = self.slots(t), self.close_rules()[0]
    out = []
    if self.pooling == "attention":
      out.append(workload_lib.Blocks("pool_1", 1, g, m, t, g * m, self.map_keys(m),
                                     self.rescored(g * m), cross=True, stacked=False))
    if self.upsampling == "attention":
      out.append(workload_lib.Blocks("upsample_0", 1, t, g, g, t * g, g, 0.0, cross=True,
                                     stacked=False))
    return out

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base.choice(cfg, "boundaries", boundaries_lib.SOURCES)
    for name in ("entropy_trains_trunk", "boundary_null_group"):
      if not isinstance(cfg[name], bool):
        raise ConfigError(f"model.{name}", f"must be True or False, got {cfg[name]!r}")


# The fields this class adds, by name: a model without them refuses them in
# one line, and configs saved when every model carried them still load
# (hiertx.config.from_json drops them from the models that do not).
FIELDS = frozenset(base.field_names(ContentGroupedLM) - base.field_names(base.LanguageModel))


def has_content_groups(cls) -> bool:
  """Whether model class `cls` may group its first shortening by content."""
  return issubclass(cls, ContentGroupedLM)


def check_content_groups(cfg, k: int) -> None:
  """What content groups (hiertx.boundaries) need, for a first shortening by k."""
  kind = cfg["boundaries"]
  for name in ("pooling", "upsampling"):
    if cfg[name] == "linear":
      raise ConfigError(f"model.{name}", f"linear has one weight per offset in a fixed group; "
                        f"with boundaries={kind!r} use mean/attention pooling, "
                        "repeat/attention upsampling")
  if kind == "dynamic" and cfg["upsampling"] != "repeat":
    raise ConfigError("model.upsampling", f"{cfg['upsampling']!r}: boundaries='dynamic' "
                      "upsamples as H-Net does (repeat, smoothed, confidence-weighted); use "
                      "upsampling='repeat'")
  base.choice(cfg, "boundary_predictor", boundaries_lib.PREDICTORS)
  base.choice(cfg, "boundary_eval", boundaries_lib.EVALS)
  base.choice(cfg, "dynamic_chunk", boundaries_lib.CHUNKS)
  if not isinstance(cfg["dynamic_rules"], bool):
    raise ConfigError("model.dynamic_rules", f"must be True or False, got {cfg['dynamic_rules']!r}")
  rules = kind != "dynamic" or cfg["dynamic_rules"]
  if kind == "dynamic" and cfg["dynamic_chunk"] == "boundary" and cfg["pooling"] != "mean":
    raise ConfigError("model.pooling", f"{cfg['pooling']!r} is not used: boundaries='dynamic' "
                      "with dynamic_chunk='boundary' keeps each chunk's boundary state "
                      "(H-Net); set model.dynamic_chunk='pool' to pool the group")
  if kind == "dynamic" and cfg["dynamic_chunk"] == "pool" and not rules:
    raise ConfigError("model.dynamic_chunk", "'pool' pools a window of model.max_group bytes, "
                      "which needs the close rules: set model.dynamic_rules=True")
  base.positive(cfg, "max_group")
  for name, low in (("group_capacity", 1.0), ("boundary_temperature", 0.0),
                    ("entropy_threshold", 0.0), ("boundary_prior_weight", 0.0),
                    ("ratio_loss_weight", 0.0)):
    v = cfg[name]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low:
      raise ConfigError(f"model.{name}", f"must be a number >= {low}, got {v!r}")
  if rules and cfg["max_group"] < k:
    raise ConfigError("model.max_group", f"{cfg['max_group']} is below the target group "
                      f"length {k} (the first shortening's factor)")
