"""Content-dependent groups for a model's first shortening (docs/design.md section 9).

Fixed shortening closes a group every k bytes. Here a *boundary source* says,
for each fine position t, whether a group should close at t, from bytes 0..t
only (the causality rule: a group's vector ends at its last byte):

  whitespace  t is a space-like byte after a byte that is not (SpaceByte,
              Slagle 2024, places its coarse positions at such bytes)
  entropy     the next-byte entropy of a small head on the states being
              shortened (hourglass: after its first pre blocks; top_down: the
              embeddings) exceeds `model.entropy_threshold` bits (the Byte
              Latent Transformer, Pagnoni et al. 2024, cuts where a small byte
              model's entropy is high); the head is trained with its own
              next-byte loss beside the model's, on a stop-gradient copy of
              the states (BLT trains its entropy model apart;
              `model.entropy_trains_trunk=True` lets the loss train the trunk
              too). Not the model's own output: at t it already reads the
              group the decision at t would close
  learned     a predictor on the same states, trained through a
              Gumbel-sigmoid relaxation with a binomial prior on the boundary
              rate (Dynamic Token Pooling, Nawrot et al. 2023); evaluation
              and decoding sample the noise too, as DTP does, from a fixed
              draw per document position (`position_noise`;
              `model.boundary_eval="threshold"` closes where `logit > 0`
              instead). With `model.boundary_temperature=0` there is no
              noise (training closes where `logit > 0`, straight through the
              sigmoid, as evaluation does). The language model's gradient
              reaches every boundary variable, closing or not, through the
              group memberships (`dtp_gradient`, DTP's straight-through
              cumulative sum)
  dynamic     H-Net's routing (Hwang et al. 2025): the probability
              p_t = (1 - cos(q_t, k_{t-1})) / 2 of adjacent projections of the
              same states (1 at a document's first byte) closes a group where
              p_t >= 1/2; a ratio loss (weight `model.ratio_loss_weight`)
              pulls the closing rate toward 1/k. The coarse outputs are
              smoothed before upsampling, z~_g = P_g z_g + (1 - P_g) z~_{g-1}
              with P_g the p at group g's close (1 at a document's first
              group), and the upsampled vector at every fine position is
              multiplied by the confidence of its decision (p_t where a group
              closed, 1 - p_t elsewhere) straight through: 1 in value, the
              routing's gradient at every position (`Route`)

Two rules then apply, the same way in the forward pass and in cached decoding
(`close_step`), both counted within the document (so packed documents never
affect each other's groups):

  * a group closes when it has `max_group` bytes of its document (so a group's
    members are at most the last `max_group` positions before its end, after
    the previous end and in its document);
  * a close is *dropped* when the document already has `budget(pos)` groups:
    at most `capacity * (pos + 1) / k` groups by its position pos. Summed over
    a row's documents that is at most `capacity * T / k`, which fixes the
    number of coarse slots per row (static shapes); it is decided from
    positions <= t, so it is causal too. Dropped closes are counted in the
    metrics.

A position before its document's first group reads no coarse vector.

A content-grouped coarse scale (`coarse_scale`) keeps per-row ends; slots past
a row's last group are unused (document 0, end FAR) and no real position
reads them.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiertx import attention as attention_lib
from hiertx import layers
from hiertx import scales

SOURCES = ("fixed", "whitespace", "entropy", "learned", "dynamic")
# Space-like bytes as hiertx.tasks' byte vocabulary (seqio.ByteVocabulary:
# id = byte + 3) numbers them: space, tab, newline, carriage return, vertical
# tab, form feed.
SPACE_IDS = tuple(b + 3 for b in b" \t\n\r\x0b\x0c")
# The budget's capacity is kept in 1/64ths so that the forward pass (numpy for
# the slot count, jnp for the rule) and decoding agree exactly.
_CAPACITY_UNITS = 64
# The collections a forward pass adds auxiliary losses and boundary counts to.
LOSSES = "losses"
STATS = "stats"


def capacity_units(capacity: float) -> int:
  return max(1, round(capacity * _CAPACITY_UNITS))


def budget(pos, k: int, capacity: float):
  """Groups a document may have closed by its position `pos` (numpy or jnp,
  exact integers)."""
  return (pos + 1) * capacity_units(capacity) // (_CAPACITY_UNITS * k)


def num_slots(length: int, k: int, capacity: float) -> int:
  """Coarse slots per row for `length` fine positions (the documents' budgets
  sum to at most this; capacity 0, no budget: every position may close)."""
  if not capacity:
    return max(1, length)
  return max(1, int(budget(np.int64(max(length, 1) - 1), k, capacity)))


def is_space(tokens):
  return jnp.isin(tokens, jnp.asarray(SPACE_IDS, tokens.dtype))


def whitespace_wants(tokens_BxT, pos_BxT):
  """Closes at a space-like byte that follows a byte that is not (a run of
  spaces is one group's end, as at indentation)."""
  space = is_space(tokens_BxT)
  prev_space = jnp.pad(space, ((0, 0), (1, 0)))[:, :-1] & (pos_BxT > 0)
  return space & ~prev_space


def close_step(carry, want_B, pos_B, seg_B, t, *, k: int, capacity: float, max_group: int):
  """One position of the close rules (`max_group` 0: no forced closes;
  `capacity` 0: no dropped closes). carry = (last close position, or the
  document's start - 1 [B]; groups of the row so far [B]; of the document so
  far [B]); returns the new carry and (kept close, dropped close, forced
  close), each bool [B]."""
  last_B, count_B, doc_count_B = carry
  start_B = pos_B == 0
  last_B = jnp.where(start_B, t - 1, last_B)
  doc_count_B = jnp.where(start_B, 0, doc_count_B)
  real_B = seg_B > 0  # packing padding never closes a group
  full_B = (t - last_B >= max_group) if max_group else jnp.zeros_like(want_B)
  wish_B = real_B & (want_B | full_B)
  keep_B = (wish_B & (doc_count_B < budget(pos_B, k, capacity))) if capacity else wish_B
  add_B = keep_B.astype(count_B.dtype)
  return ((jnp.where(keep_B, t, last_B), count_B + add_B, doc_count_B + add_B),
          (keep_B, wish_B & ~keep_B, keep_B & ~want_B))


def close_groups(want_BxT, pos_BxT, seg_BxT, *, k: int, capacity: float, max_group: int):
  """(kept closes, dropped closes, forced closes), bool [B, T], for whole rows."""
  b, t = want_BxT.shape
  zeros_B = jnp.zeros((b,), jnp.int32)
  init = (zeros_B - 1, zeros_B, zeros_B)

  def body(carry, xs):
    return close_step(carry, *xs, k=k, capacity=capacity, max_group=max_group)

  xs = (want_BxT.T, pos_BxT.T, seg_BxT.T, jnp.arange(t, dtype=jnp.int32))
  _, outs = jax.lax.scan(body, init, xs)
  return tuple(o.T for o in outs)


@flax.struct.dataclass
class Route:
  """What dynamic routing (H-Net) adds to the coarse level's way back."""

  smooth_BxG: jax.Array  # P_g: the EMA's weight of group g's own output, in [1e-4, 1 - 1e-4]
  restart_BxG: jax.Array  # bool: group g starts its document's average from zero
  weight_BxT: jax.Array  # STE(c_t): 1 in value, the confidence's gradient at every fine position
  residual_BxTxD: jax.Array  # residual_proj(h_t): what the smoothed outputs are added to


# H-Net's DeChunkLayer clamps the EMA's weights to [1e-4, 1 - 1e-4].
_P_CLAMP = 1e-4


def ema_weight(p):
  return jnp.clip(p, _P_CLAMP, 1.0 - _P_CLAMP)


def smooth(z_BxGxD, p_BxG, restart_BxG):
  """z~_g = P_g z_g + (1 - P_g) z~_{g-1} along each row's slots, with
  z~_{g-1} = 0 where `restart` (a document's first group): an associative
  scan of the linear recurrence."""
  p = p_BxG[..., None].astype(z_BxGxD.dtype)
  decay = jnp.where(restart_BxG[..., None], 0.0, 1.0 - p).astype(z_BxGxD.dtype)

  def combine(a, b):
    (decay_a, add_a), (decay_b, add_b) = a, b
    return decay_a * decay_b, decay_b * add_a + add_b

  return jax.lax.associative_scan(combine, (decay, p * z_BxGxD), axis=1)[1]


def ratio_loss(wish_BxT, p_BxT, real_BxT, k: int):
  """H-Net's ratio loss toward a closing rate of 1/k: with F the share of
  positions that wish to close and G their mean probability,
  k / (k - 1) ((k - 1) F G + (1 - F)(1 - G)); 1 when F = G = 1/k."""
  w = real_BxT.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  f = (wish_BxT.astype(jnp.float32) * w).sum() / n
  g = (p_BxT * w).sum() / n
  return k / (k - 1) * ((k - 1) * f * g + (1 - f) * (1 - g))


@flax.struct.dataclass
class Groups:
  """Where each group of one row ends, and which group each position reads."""

  close_BxT: jax.Array  # bool: a (kept) group closes at t
  latest_BxT: jax.Array  # int32: the slot of the last group closed at or before t (-1: none)
  end_BxG: jax.Array  # int32: the position slot g closed at (FAR: unused slot)
  prev_end_BxG: jax.Array  # int32: the position slot g - 1 closed at (-1 for g = 0)

  @property
  def used_BxG(self):
    return self.end_BxG < attention_lib.FAR


def groups(close_BxT, slots: int) -> Groups:
  b, t = close_BxT.shape
  latest_BxT = jnp.cumsum(close_BxT.astype(jnp.int32), axis=1) - 1
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  slot_BxT = jnp.where(close_BxT, latest_BxT, slots)  # slot `slots`: dropped by the scatter
  pos_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  end_BxG = jnp.full((b, slots), attention_lib.FAR, jnp.int32).at[rows, slot_BxT].set(
      pos_BxT, mode="drop")
  prev_BxG = jnp.pad(end_BxG, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return Groups(close_BxT, latest_BxT, end_BxG, prev_BxG)


def window(x_BxLxD, end_BxG, prev_end_BxG, seg_BxL, max_group: int):
  """The members of each group: the `max_group` positions up to its end, valid
  after the previous end and in the end's document. [B, G, M, D], [B, G, M].
  An unused slot's window is the row's last position alone (finite, unread)."""
  length = x_BxLxD.shape[1]
  end_BxG = jnp.minimum(end_BxG, length - 1)
  idx_BxGxM = end_BxG[..., None] - max_group + 1 + jnp.arange(max_group)
  safe = jnp.clip(idx_BxGxM, 0, length - 1)
  b, g, m = safe.shape
  members = jnp.take_along_axis(x_BxLxD, safe.reshape(b, g * m, 1), axis=1).reshape(b, g, m, -1)
  seg_end_BxG = jnp.take_along_axis(seg_BxL, end_BxG, axis=1)
  seg_BxGxM = jnp.take_along_axis(seg_BxL, safe.reshape(b, g * m), axis=1).reshape(b, g, m)
  valid = ((idx_BxGxM >= 0) & (idx_BxGxM > prev_end_BxG[..., None])
           & (seg_BxGxM == seg_end_BxG[..., None]))
  return members, valid.at[..., -1].set(True)


def coarse_scale(fine: scales.Scale, grp: Groups) -> scales.Scale:
  """The content-grouped scale: per-row ends, documents and within-document
  positions of each group's last byte; unused slots are document 0."""
  end = jnp.minimum(grp.end_BxG, fine.seg_BxL.shape[1] - 1)
  used = grp.used_BxG
  seg = jnp.where(used, jnp.take_along_axis(fine.seg_BxL, end, axis=1), 0)
  pos_BxT = fine.pos_BxL if fine.pos_BxL is not None else jnp.broadcast_to(
      fine.end_L, fine.seg_BxL.shape)
  pos = jnp.where(used, jnp.take_along_axis(pos_BxT, end, axis=1), 0)
  g = grp.end_BxG.shape[1]
  return scales.Scale(seg, ((g, 1, 0),), pos, grp.end_BxG)


def binomial_nll(closes_B, n_B, rate: float):
  """-log Binomial(closes; n, rate), differentiable in `closes` (lgamma)."""
  lg = jax.scipy.special.gammaln
  return -(lg(n_B + 1) - lg(closes_B + 1) - lg(n_B - closes_B + 1)
           + closes_B * np.log(rate) + (n_B - closes_B) * np.log1p(-rate))


PREDICTORS = ("layernorm", "dtp")
CHUNKS = ("boundary", "pool")
# learned with noise, at evaluation and in decoding: "sample" draws the noise
# as training does (DTP samples there too), "threshold" closes where logit > 0.
EVALS = ("sample", "threshold")


def position_noise(pos):
  """Logistic noise log u - log(1 - u), u ~ U(0, 1), that depends only on a
  position within its document (`pos`, any shape): what `learned` adds to
  its logits at evaluation and in decoding with `boundary_eval="sample"`.
  A document's groups then do not depend on its row, its packing, or whether
  it is decoded or run whole, and evaluation is repeatable."""
  key = jax.random.PRNGKey(0)
  draw = lambda p: jax.random.uniform(jax.random.fold_in(key, p), (), jnp.float32, 1e-6, 1 - 1e-6)
  u = jax.vmap(draw)(pos.reshape(-1).astype(jnp.uint32)).reshape(pos.shape)
  return jnp.log(u) - jnp.log1p(-u)


class Source(nn.Module):
  """What decides a close at t before the close rules: `want(...)` for a whole
  row, `want_step(...)` for one decoding position. `entropy` and `learned`
  read the fine states before shortening and add their training losses to
  the `losses` collection; `dynamic` reads the shortening's RMS-normalised
  states (`Shortening.normed`).

  learned's predictor: "layernorm" (LayerNorm, d -> d, GELU, -> 1) or "dtp"
  (Dynamic Token Pooling's: d -> mlp_dim, ReLU, -> 1 on the raw states).
  With noise (temperature > 0) its evaluation and decoding `sample` as DTP
  does (`position_noise`) or close where the logit is above 0 (`threshold`)."""

  kind: str
  k: int
  vocab_size: int
  padded_vocab: int
  cfg: layers.BlockConfig
  entropy_threshold: float = 3.0
  temperature: float = 1.0
  prior_weight: float = 1.0
  entropy_trains_trunk: bool = False
  ratio_weight: float = 0.03
  predictor: str = "layernorm"
  evaluate: str = "sample"

  def setup(self):
    c = self.cfg
    if self.kind == "entropy":
      self.head = layers.Head(self.padded_vocab, c)
    elif self.kind == "dynamic":
      # H-Net initialises both projections to the identity: p starts as the
      # cosine dissimilarity of adjacent states.
      eye = nn.with_logical_partitioning(
          lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], shape[1], dtype=dtype),
          ("embed", "mlp"))
      self.route_q = nn.Dense(c.d_model, use_bias=False, dtype=jnp.float32, kernel_init=eye)
      self.route_k = nn.Dense(c.d_model, use_bias=False, dtype=jnp.float32, kernel_init=eye)
    elif self.kind == "learned":
      width = c.mlp_dim if self.predictor == "dtp" else c.d_model
      if self.predictor == "layernorm":
        self.ln = layers.layer_norm(c.jnp_dtype)
      self.hidden = nn.Dense(width, dtype=c.jnp_dtype,
                             kernel_init=layers.kernel_init(c, ("embed", "mlp")))
      self.out = nn.Dense(1, dtype=jnp.float32,
                          kernel_init=layers.kernel_init(c, ("mlp", None)))

  def _entropy_bits(self, x_BxLxD):
    logits = self.head(x_BxLxD)[..., :self.vocab_size].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1) / np.log(2.0), logits

  def entropy_bits(self, x_BxLxD):
    """The entropy head's next-byte entropy in bits, [B, L] (boundaries=entropy)."""
    return self._entropy_bits(x_BxLxD)[0]

  def route_keys(self, h_BxLxD):
    """(unit queries, unit keys) of the dynamic routing, float32 [..., D]."""
    h = h_BxLxD.astype(jnp.float32)
    unit = lambda v: v * jax.lax.rsqrt(jnp.maximum((v * v).sum(-1, keepdims=True), 1e-24))
    return unit(self.route_q(h)), unit(self.route_k(h))

  def probability(self, q, prev_k, first):
    """p = (1 - cos(q_t, k_{t-1})) / 2, 1 at a document's first byte."""
    return jnp.where(first, 1.0, jnp.clip(0.5 * (1.0 - (q * prev_k).sum(-1)), 0.0, 1.0))

  def _logit(self, x_BxLxD):
    if self.predictor == "dtp":
      return self.out(nn.relu(self.hidden(x_BxLxD)))[..., 0].astype(jnp.float32)
    return self.out(nn.gelu(self.hidden(self.ln(x_BxLxD))))[..., 0].astype(jnp.float32)

  def want(self, tokens_BxT, x_BxTxD, fine: scales.Scale, deterministic: bool):
    """bool [B, T] wishes, and the relaxed boundary variables whose gradient
    `dtp_gradient` carries (learned, training) or the routing probability
    (dynamic); else None."""
    if self.kind == "whitespace":
      return whitespace_wants(tokens_BxT, fine.rotary_pos), None
    real = fine.seg_BxL > 0
    if self.kind == "dynamic":
      q, k = self.route_keys(x_BxTxD)
      layers.remember(self, "route_keys", k)  # a decoder's k_{t-1}
      prev_k = jnp.pad(k, ((0, 0), (1, 0), (0, 0)))[:, :-1]
      p = self.probability(q, prev_k, fine.rotary_pos == 0)
      if not deterministic:
        p = self.perturb("boundary_p", p)  # tests read the LM loss's gradient here
        self.sow(LOSSES, "ratio", self.ratio_weight * ratio_loss(p > 0.5, p, real, self.k))
      # H-Net's argmax over (1 - p, p): a tie does not close.
      return p > 0.5, p
    if self.kind == "entropy":
      # The head learns from a copy of the states (BLT trains its entropy model
      # apart): its loss does not train the trunk it reads, unless asked to.
      h_in = x_BxTxD if self.entropy_trains_trunk else jax.lax.stop_gradient(x_BxTxD)
      h_bits, logits = self._entropy_bits(h_in)
      if not deterministic:  # the head's own next-byte loss, within documents
        nxt = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
        same = real & (jnp.pad(fine.seg_BxL[:, 1:], ((0, 0), (0, 1))) == fine.seg_BxL)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[..., None], -1)[..., 0]
        w = same.astype(jnp.float32)
        self.sow(LOSSES, "entropy_head", (nll * w).sum() / jnp.maximum(w.sum(), 1.0))
      return jax.lax.stop_gradient(h_bits) > self.entropy_threshold, None
    logit = self._logit(x_BxTxD)
    if deterministic:
      return self._closes(logit, fine.rotary_pos), None
    logit = self.perturb("boundary_logit", logit)  # tests read the LM loss's gradient here
    if self.temperature > 0:
      # Gumbel-sigmoid (a relaxed Bernoulli) with a straight-through hard sample.
      u = jax.random.uniform(self.make_rng("dropout"), logit.shape, jnp.float32, 1e-6, 1 - 1e-6)
      soft = jax.nn.sigmoid((logit + jnp.log(u) - jnp.log1p(-u)) / self.temperature)
    else:
      # No noise: training closes where evaluation does, straight through the sigmoid.
      soft = jax.nn.sigmoid(logit)
    hard = soft > 0.5
    st = hard.astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))
    w = real.astype(jnp.float32)
    prior = binomial_nll((st * w).sum(1), w.sum(1), 1.0 / self.k) / jnp.maximum(w.sum(1), 1.0)
    self.sow(LOSSES, "boundary_prior", self.prior_weight * prior.mean())
    return hard, soft

  def want_step(self, token_B, prev_token_B, x_BxD, t, prev_key_BxD=None):
    """Decoding: the wish at position t (bytes <= t; the state before
    shortening, normalised for dynamic), and (dynamic) the routing's
    probability and key at t (else None)."""
    if self.kind == "dynamic":
      q, k = self.route_keys(x_BxD)
      p = self.probability(q, prev_key_BxD, t == 0)
      return p > 0.5, p, k
    if self.kind == "whitespace":
      return is_space(token_B) & ~(is_space(prev_token_B) & (t > 0)), None, None
    if self.kind == "entropy":
      return self._entropy_bits(x_BxD)[0] > self.entropy_threshold, None, None
    return self._closes(self._logit(x_BxD), t), None, None

  def _closes(self, logit, pos):
    """learned's closes at evaluation and in decoding, at document positions `pos`."""
    if self.temperature > 0 and self.evaluate == "sample":
      # The hard sample sigmoid((logit + noise) / temperature) > 1/2.
      return logit + position_noise(pos) > 0
    return logit > 0


def dtp_gradient(soft_BxT, members_BxGxMxD, grp: Groups, seg_BxL, max_group: int):
  """Zero in value, [B, G, D]; added to the mean-pooled groups it gives the
  boundary variables the gradient of Dynamic Token Pooling (Nawrot et al.
  2023, section 3): position l belongs to group s_l = sum_{j<l} b_j (an
  exclusive cumulative sum of the straight-through boundaries b = hard +
  soft - stop_gradient(soft)), so a group's mean h_g = sum_{l: s_l=g} x_l / n_g
  has d h_g / d b_j = sum_{l in g, l > j} (x_l - h_g) / n_g. The sum over a
  whole group of (x_l - h_g) is zero, so only boundaries inside g before its
  last member receive g's gradient; its last (closing) position receives
  none, and the gradient does not change when a constant is added to every
  state. `members` are each group's window (the states up to its end, after
  the previous end, in its document)."""
  soft_BxGxM, valid_BxGxM = window(soft_BxT[..., None], grp.end_BxG, grp.prev_end_BxG,
                                   seg_BxL, max_group)
  valid = (valid_BxGxM & grp.used_BxG[..., None]).astype(jnp.float32)
  soft = soft_BxGxM[..., 0]
  change = (soft - jax.lax.stop_gradient(soft)) * valid
  # b_j for the members before m (zero in value, the gradient of each b_j).
  before_BxGxM = jnp.cumsum(change, axis=-1) - change
  x = jax.lax.stop_gradient(members_BxGxMxD).astype(jnp.float32)
  n_BxG = jnp.maximum(valid.sum(-1), 1.0)
  mean_BxGxD = jnp.einsum("bgm,bgmd->bgd", valid, x) / n_BxG[..., None]
  centred = (x - mean_BxGxD[:, :, None]) * valid[..., None]
  out = jnp.einsum("bgm,bgmd->bgd", before_BxGxM, centred) / n_BxG[..., None]
  return out.astype(members_BxGxMxD.dtype)


def record(module: nn.Module, close_BxT, drop_BxT, forced_BxT, seg_BxT, suffix: str = "") -> None:
  """Counts for the metrics: kept, dropped and forced closes, real positions
  (a second stage's names end in `suffix`)."""
  real = seg_BxT > 0
  for name, v in (("closes", close_BxT & real), ("dropped", drop_BxT & real),
                  ("forced", forced_BxT & real), ("positions", real)):
    module.sow(STATS, name + suffix, v.sum().astype(jnp.float32))


def source_params(kind: str, d: int, padded_vocab: int, mlp: int = 0,
                  predictor: str = "layernorm", null_group: bool = False) -> int:
  """Parameters of a boundary source and its shortening's own layers (for
  the analytic cost model)."""
  if kind == "learned":
    width = mlp if predictor == "dtp" else d
    return (0 if predictor == "dtp" else 2 * d) + d * width + width + width + 1 + d * null_group
  return {"entropy": 2 * d + d * padded_vocab,  # LayerNorm, vocabulary head
          # RMSNorm, query and key projections, the residual projection
          "dynamic": d + 2 * d * d + d * d + d}.get(kind, 0)


def init_state(batch: int, width: int) -> list:
  """A `Shortening`'s decoding state before position 0 (no parameters needed)."""
  zeros_B = jnp.zeros((batch,), jnp.int32)
  return [zeros_B - 1, zeros_B, zeros_B, jnp.zeros((batch, width), jnp.float32)]


class Shortening(nn.Module):
  """A model's first shortening by content: the boundary source, the close
  rules and the pooling of each group's window, for the forward pass
  (`__call__`) and for decoding (`step`, `closing_group`, `prompt_state`).
  `k` is the target mean group length; `pool` (a scales.Pool of the model)
  pools each window. `max_group` 0 and `capacity` 0 turn the close rules off
  (every position may then close: a row has T slots).

  dynamic (H-Net's chunking): the states are RMS-normalised first (H-Net's
  encoder ends in an RMSNorm); the router reads them; `chunk="boundary"`
  keeps the normalised state at each group's boundary (H-Net's ChunkLayer),
  "pool" pools the group's window instead; on the way back
  `residual_proj(h_t) + STE(c_t) * z~_{latest(t)}` with the EMA-smoothed
  coarse outputs z~, c_t = max(p_t, 1 - p_t) and a zero-initialised float32
  projection (H-Net's DeChunkLayer and residual).

  `null_group` (learned, DTP's): a learned vector that the coarse level reads
  alone (`null_output`); a position before its document's first group
  receives that output where it would otherwise receive nothing.

  Decoding state: [last close position, groups so far, previous token], each
  [B], and the previous position's routing key [B, D] (dynamic; unused
  otherwise); a decoded stream is one document from position 0.
  """

  kind: str
  k: int
  vocab_size: int
  padded_vocab: int
  cfg: layers.BlockConfig
  max_group: int = 16
  capacity: float = 1.5
  entropy_threshold: float = 3.0
  temperature: float = 1.0
  prior_weight: float = 1.0
  entropy_trains_trunk: bool = False
  ratio_weight: float = 0.03
  predictor: str = "layernorm"
  chunk: str = "boundary"
  # Which shortening of the model this is: 0 reads the bytes; 1 (H-Net's
  # second stage) reads stage 0's chunks, and keeps its decoding state under
  # "groups_1", its coarse outputs at level 2, its counts as "closes_1", ...
  stage: int = 0
  null_group: bool = False
  evaluate: str = "sample"  # learned with noise: Source.evaluate

  def setup(self):
    self.source = Source(self.kind, self.k, self.vocab_size, self.padded_vocab, self.cfg,
                         self.entropy_threshold, self.temperature, self.prior_weight,
                         self.entropy_trains_trunk, self.ratio_weight, self.predictor,
                         self.evaluate)
    if self.kind == "dynamic":
      embed = lambda init: nn.with_logical_partitioning(init, ("embed",))
      self.norm = nn.RMSNorm(epsilon=1e-5, dtype=jnp.float32,
                             scale_init=embed(nn.initializers.ones))
      self.residual_proj = nn.Dense(
          self.cfg.d_model, dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")),
          bias_init=embed(nn.initializers.zeros))
    if self.null_group:  # DTP initialises its null group from N(0, 1)
      self.null = self.param("null_group", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ("embed",)), (self.cfg.d_model,), jnp.float32)

  def null_output(self, coarse, dtype):
    """DTP's null group through the coarse level, [D] (None without one):
    `coarse(x_1x1xD, scale)` runs the coarse level on the null vector alone
    (as DTP's shortened sequence begins with it, and causal attention lets it
    read only itself). Call it before the coarse level's own pass, whose
    remembered states a decoder's prompt pass keeps."""
    if not self.null_group:
      return None
    one = jnp.ones((1, 1), jnp.int32)
    scale = scales.Scale(one, ((1, 1, 0),), one - 1, one - 1)
    return coarse(self.null.astype(dtype)[None, None], scale)[0, 0]

  def slots(self, length: int) -> int:
    """Coarse slots per row over `length` fine positions."""
    return num_slots(length, self.k, self.capacity)

  @property
  def suffix(self) -> str:
    """What a second stage's state key and counts end in."""
    return f"_{self.stage}" if self.stage else ""

  def _rules(self):
    return dict(k=self.k, capacity=self.capacity, max_group=self.max_group)

  def normed(self, x):
    """What the source and the chunks read: dynamic's RMS-normalised states
    (float32), else the states themselves."""
    return self.norm(x) if self.kind == "dynamic" else x

  def __call__(self, x_BxTxD, fine: scales.Scale, tokens_BxT, pool, deterministic: bool):
    """Groups of the states `x` (which the source reads too): (pooled
    [B, G, D], the coarse scale, the slot each fine position reads [B, T],
    and for dynamic routing its `Route`, else None)."""
    t = x_BxTxD.shape[1]
    h_BxTxD = self.normed(x_BxTxD)
    want_BxT, soft_BxT = self.source.want(tokens_BxT, h_BxTxD, fine, deterministic)
    close_BxT, drop_BxT, forced_BxT = close_groups(want_BxT, fine.rotary_pos, fine.seg_BxL,
                                                   **self._rules())
    record(self, close_BxT, drop_BxT, forced_BxT, fine.seg_BxL, self.suffix)
    layers.remember(self, "closes", close_BxT)
    layers.remember(self, "tokens", tokens_BxT)
    grp = groups(close_BxT, self.slots(t))
    coarse = coarse_scale(fine, grp)
    if self.kind == "dynamic" and self.chunk == "boundary":
      end_BxG = jnp.minimum(grp.end_BxG, t - 1)  # an unused slot keeps the last state, unread
      z_BxGxD = jnp.take_along_axis(h_BxTxD, end_BxG[..., None], axis=1).astype(x_BxTxD.dtype)
    else:
      members, valid = window(h_BxTxD, grp.end_BxG, grp.prev_end_BxG, fine.seg_BxL,
                              self.max_group)
      z_BxGxD = pool.group(members, valid, deterministic).astype(x_BxTxD.dtype)
    if self.kind == "dynamic":
      route = self._route(soft_BxT, grp, coarse, self.residual(h_BxTxD).astype(x_BxTxD.dtype))
      return z_BxGxD, coarse, grp.latest_BxT, route
    if soft_BxT is not None:  # learned, training: DTP's gradient to the boundaries
      z_BxGxD = z_BxGxD + dtp_gradient(soft_BxT, members, grp, fine.seg_BxL, self.max_group)
    return z_BxGxD, coarse, grp.latest_BxT, None

  def _route(self, p_BxT, grp: Groups, coarse: scales.Scale, residual_BxTxD) -> Route:
    t = p_BxT.shape[1]
    p_BxG = jnp.take_along_axis(p_BxT, jnp.minimum(grp.end_BxG, t - 1), axis=1)
    # A document's first group (and an unused slot) starts the average from zero.
    first_BxG = coarse.seg_BxL != jnp.pad(coarse.seg_BxL, ((0, 0), (1, 0)))[:, :-1]
    confidence = jnp.maximum(p_BxT, 1.0 - p_BxT)
    return Route(ema_weight(p_BxG), first_BxG | ~grp.used_BxG,
                 1.0 + (confidence - jax.lax.stop_gradient(confidence)), residual_BxTxD)

  def residual(self, h):
    """Dynamic's zero-initialised float32 projection of the normalised states
    `h` (`normed`): the fine residual the way back adds to."""
    return self.residual_proj(h)

  def upsample(self, upsample, fine_BxTxD, z_BxGxD, latest_BxT, fine: scales.Scale,
               coarse: scales.Scale, route: "Route | None", deterministic: bool, null_D=None):
    """`upsample.groups` of the coarse outputs `z` (and the null group's,
    `null_output`); with dynamic routing's `route`, of the smoothed outputs
    (`smooth`) weighted by the confidence, onto the projected residual (the
    states `__call__` read; `fine_BxTxD` is not read again)."""
    if route is None:
      return upsample.groups(fine_BxTxD, z_BxGxD, latest_BxT, fine, coarse, deterministic,
                             null_D=null_D)
    z_BxGxD = smooth(z_BxGxD, route.smooth_BxG, route.restart_BxG)
    layers.remember(self, "smoothed", z_BxGxD)  # a decoder's smoothed coarse cache
    return upsample.groups(route.residual_BxTxD, z_BxGxD, latest_BxT, fine, coarse,
                           deterministic, route.weight_BxT)

  def step(self, state, token_B, h_BxD, t_B, active_B):
    """Fine index t_B [B] (its own per row for a second stage) with the
    (normalised, for dynamic) state `h`, in the rows that are `active_B`:
    (the slot a group closing there goes to per row (-1: none closes in that
    row), the new state (inactive rows keep theirs), each row's last closed
    slot, dynamic's p [B] or None)."""
    last_B, count_B, prev_B, prev_key_BxD = state
    want_B, p_B, key_BxD = self.source.want_step(token_B, prev_B, h_BxD, t_B, prev_key_BxD)
    (new_last_B, new_count_B, _), (close_B, _, _) = close_step(
        (last_B, count_B, count_B), want_B, t_B, active_B.astype(jnp.int32), t_B,
        **self._rules())
    slot_B = jnp.where(close_B, count_B, -1)
    new = [new_last_B, new_count_B, token_B.astype(jnp.int32),
           prev_key_BxD if key_BxD is None else key_BxD]
    new = [jnp.where(active_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
           for n, o in zip(new, state)]
    return slot_B, new, new[1] - 1, p_B

  def decode_step(self, st: dict, token_B, x_BxD, t, cache_BxCxD, pool, coarse, upsample,
                  index_B=None, null_D=None):
    """Fine position t of a model whose shortening `stage` groups by content:
    the close rules on the state `x` [B, D]; where a row closes a group,
    `coarse(st, z_BxD, slot_B) -> (st, y_BxD)` runs the coarse scale on the
    group (pooled from `cache`, fine states with the newest included; for
    dynamic's boundary chunks the state itself) at that row's new slot, and
    `upsample`'s cached keys take `y`; then `upsample` brings each row's last
    closed group (`st["z"][stage + 1]`) back. `st` holds this stage's state
    ("groups" or "groups_1"), "z" and "up" (hourglass, top_down); returns
    (st, x_BxD). A second stage runs at its fine index `index_B` [B] (the
    first stage's new slot; -1: this row gains none and is left as it was).
    `null_D`: the null group's output (`null_output`), if the model has one."""
    key, level = "groups" + self.suffix, self.stage + 1
    b = x_BxD.shape[0]
    t_B = jnp.full((b,), t, jnp.int32) if index_B is None else jnp.maximum(index_B, 0)
    active_B = jnp.ones((b,), bool) if index_B is None else index_B >= 0
    h_BxD = self.normed(x_BxD)
    slot_B, groups, latest_B, p_B = self.step(st[key], token_B, h_BxD, t_B, active_B)

    def closing(st):
      if self.kind == "dynamic" and self.chunk == "boundary":
        z_BxD = h_BxD.astype(x_BxD.dtype)
      else:
        z_BxD = self.closing_group(st[key], cache_BxCxD, t_B, pool).astype(x_BxD.dtype)
      st, y_BxD = coarse(st, z_BxD, slot_B)
      if p_B is not None:  # dynamic: the coarse cache holds the smoothed outputs
        z = st["z"][level]
        prev_BxD = jnp.take_along_axis(z, jnp.maximum(slot_B - 1, 0)[:, None, None], axis=1)[:, 0]
        prev_BxD = prev_BxD * (slot_B > 0)[:, None].astype(prev_BxD.dtype)
        w_Bx1 = ema_weight(p_B)[:, None].astype(y_BxD.dtype)
        y_BxD = w_Bx1 * y_BxD + (1 - w_Bx1) * prev_BxD
        zs = list(st["z"])
        zs[level] = layers.set_rows(z, slot_B, y_BxD)
        st = dict(st, z=zs)
      if st["up"]:
        ups = list(st["up"])
        ups[self.stage] = ups[self.stage].set(slot_B, upsample.coarse_keys(y_BxD, t))
        st = dict(st, up=ups)
      return st

    # A group closes only every few positions: the coarse scale runs then.
    st = jax.lax.cond((slot_B >= 0).any(), closing, lambda s: s, st)
    fine_BxD = (self.residual(h_BxD).astype(x_BxD.dtype) if self.kind == "dynamic"
                else x_BxD)
    x_BxD = upsample.step_groups(fine_BxD, st["z"][level], latest_B, t,
                                 st["up"][self.stage] if st["up"] else None, null_D)
    return dict(st, **{key: groups}), x_BxD

  def closing_group(self, state, cache_BxCxD, t_B, pool):
    """The group closing at t_B [B] pooled from the cached states (slot t
    holds position t; `state` from before t), [B, D]."""
    members, valid = window(cache_BxCxD, t_B[:, None], state[0][:, None],
                            jnp.ones(cache_BxCxD.shape[:2], jnp.int32), self.max_group)
    return pool.group(self.normed(members), valid)[:, 0]

  def prompt_state(self, count_B):
    """(the decoding state, groups per row [B]) after a forward pass over a
    prompt whose first `count_B` positions (an int, or per row [B]) on this
    stage's fine axis are real."""
    sown = self.variables[layers.DECODE]
    closes_BxP = sown["closes"]
    b, p = closes_BxP.shape
    count_B = jnp.broadcast_to(jnp.asarray(count_B, jnp.int32), (b,))
    closes_BxP = closes_BxP & (jnp.arange(p) < count_B[:, None])
    groups_B = closes_BxP.sum(1).astype(jnp.int32)
    last_B = jnp.max(jnp.where(closes_BxP, jnp.arange(p), -1), axis=1).astype(jnp.int32)
    at = lambda a: jnp.take_along_axis(
        a, (count_B - 1).reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]
    key_BxD = (at(sown["source"]["route_keys"]) if self.kind == "dynamic"
               else jnp.zeros((b, self.cfg.d_model), jnp.float32))
    return [last_B, groups_B, at(sown["tokens"]).astype(jnp.int32), key_BxD], groups_B

  def prompt_coarse(self, z_BxGxD):
    """The coarse cache a decoder starts from: the smoothed outputs for
    dynamic routing (as upsampled), else the outputs themselves."""
    return self.variables[layers.DECODE]["smoothed"] if self.kind == "dynamic" else z_BxGxD
