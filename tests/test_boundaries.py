"""Content-dependent groups (hiertx.boundaries): the close rules and the
learned predictor's rate. Leak, Jacobian (including that a coarse vector is
used exactly from its group's last byte on), packing, decoding and blockwise
tests run on the tiny `hourglass_whitespace/entropy/learned` and
`top_down_learned` variants with every other model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from hiertx import boundaries, layers, models, scales, steps
from tiny_models import V, model_cfg


def _rules(want, pos, seg, k=4, capacity=1.0, max_group=5):
  keep, drop = boundaries.close_groups(jnp.asarray(want), jnp.asarray(pos), jnp.asarray(seg),
                                       k=k, capacity=capacity, max_group=max_group)
  return np.asarray(keep), np.asarray(drop)


def test_close_rules_per_document():
  """Longest group, budget and document starts, on hand-made rows."""
  t = 16
  pos, seg = np.arange(t)[None], np.ones((1, t), np.int32)
  # Nothing wanted: a group closes after every max_group bytes.
  keep, drop = _rules(np.zeros((1, t), bool), pos, seg, capacity=2.0)
  assert np.flatnonzero(keep[0]).tolist() == [4, 9, 14] and not drop.any()
  # Everything wanted, capacity 1 at k=4: at most (pos + 1) // 4 groups by pos.
  keep, drop = _rules(np.ones((1, t), bool), pos, seg)
  assert np.flatnonzero(keep[0]).tolist() == [3, 7, 11, 15]
  assert drop.sum() == t - 4
  # A second document starting at 6 restarts both counts; padding never closes.
  seg2 = np.where(np.arange(t) < 6, 1, 2)[None].astype(np.int32)
  seg2[0, 14:] = 0
  pos2 = np.where(np.arange(t) < 6, np.arange(t), np.arange(t) - 6)[None]
  pos2[0, 14:] = 0
  keep, drop = _rules(np.ones((1, t), bool), pos2, seg2)
  assert np.flatnonzero(keep[0]).tolist() == [3, 9, 13]
  assert not (keep | drop)[0, 14:].any()
  # The budget sums to at most the slots of the row: every close has a slot.
  for cap in (1.0, 1.5, 2.5):
    keep, _ = _rules(np.ones((1, 64), bool), np.arange(64)[None], np.ones((1, 64), np.int32),
                     capacity=cap)
    assert keep.sum() == boundaries.num_slots(64, 4, cap)


def test_whitespace_ids_are_the_byte_vocabularys():
  assert boundaries.SPACE_IDS == tuple(seqio.ByteVocabulary().encode(" \t\n\r\x0b\x0c"))
  ids = jnp.asarray([seqio.ByteVocabulary().encode("ab  c\n\nd")])
  want = boundaries.whitespace_wants(ids, jnp.arange(ids.shape[1])[None])
  assert np.flatnonzero(want[0]).tolist() == [2, 5]  # the first of each run of spaces


def test_learned_boundary_rate_follows_its_prior(k=5):
  """Trained on the language-model loss plus the binomial prior (rate 1/k),
  the predictor's sampled boundary rate moves from about 1/2 at
  initialisation to the prior's rate within 0.06 (the sampling noise of
  ~1,000 positions is about 0.015). The budget (capacity k: one group per
  position) never binds, so the rate is the predictor's. The language
  model's gradient reaches every boundary (hiertx.boundaries.dtp_gradient)
  and on these random tokens pulls toward more groups (at weight 1 the rate
  goes to 0.15 by step 20, then back to 0.46 by step 60), so the prior is
  weighted 10 here."""
  model = models.build(model_cfg("hourglass_learned", hierarchy=f"1@1 1@{k} 1@1",
                                 max_group=16, group_capacity=float(k),
                                 boundary_prior_weight=10.0), V, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (16, 64), 1, V)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((16, 63), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(63), (16, 63)),
           "weights": jnp.ones((16, 63), jnp.int32)}
  params = jax.jit(model.init)(jax.random.PRNGKey(1), batch["inputs"])["params"]
  tx = optax.adam(1e-2)
  state = steps.TrainState(jnp.asarray(0), params, tx.init(params))
  step = jax.jit(lambda s: steps.train_step(s, batch, model=model, tx=tx, seed=0))
  rates = []
  for _ in range(60):
    state, m = step(state)
    rates.append(float(m["train/boundary_rate"]))
  assert abs(rates[0] - 0.5) < 0.1, rates[0]
  final = float(np.mean(rates[-10:]))
  assert abs(final - 1 / k) < 0.06, (k, rates[0], final)


def _pass(model, params, tokens, extra=None, key=0):
  """A training-mode forward pass: (logits, its sown collections)."""
  b, t = tokens.shape
  seg = jnp.ones((b, t), jnp.int32).at[:, t // 2:].set(2)  # two documents per row
  pos = jnp.concatenate([jnp.arange(t // 2), jnp.arange(t - t // 2)])[None].repeat(b, 0)
  return model.apply({"params": params, **(extra or {})}, tokens, seg, pos,
                     deterministic=False, rngs={"dropout": jax.random.PRNGKey(key)},
                     mutable=[boundaries.LOSSES, boundaries.STATS, "decode", "perturbations"])


def test_lm_gradient_reaches_boundaries_that_did_not_close():
  """learned (Dynamic Token Pooling's path) and dynamic (H-Net's confidence
  weighting): the language-model loss alone (no prior or ratio loss) has a
  gradient at the predictor's output at positions that did not close, not
  only at kept closes."""
  for key, site, quiet in (  # top_down's variants share the Shortening
      ("hourglass_learned", "boundary_logit", dict(boundary_prior_weight=0.0,
                                                   boundary_temperature=0.0)),
      ("hourglass_dynamic", "boundary_p", dict(ratio_loss_weight=0.0))):
    model = models.build(model_cfg(key, **quiet), V, 32)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 32), 1, V)
    params = jax.jit(model.init)(jax.random.PRNGKey(3), tokens)["params"]
    shapes = jax.eval_shape(lambda p: _pass(model, p, tokens), params)[1]["perturbations"]
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def lm_loss(perturbations):
      logits, sown = _pass(model, params, tokens, {"perturbations": perturbations})
      return (steps.token_nll(logits[:, :-1], tokens[:, 1:]).mean(),
              sown["decode"]["content_groups"]["closes"])

    grads, closes = jax.jit(jax.grad(lm_loss, has_aux=True))(zeros)
    open_ = ~np.asarray(closes)
    reached = np.abs(np.asarray(grads["content_groups"]["source"][site])) > 0
    assert open_.sum() > 20 and reached[open_].mean() > 0.5, (key, reached[open_].mean())
  # DTP's term is exactly zero in value (dynamic's weight is exactly 1: the
  # decoding tests, which leave it out, equal the forward pass).
  grp = boundaries.groups(jnp.asarray([[0, 1, 0, 0, 1, 0, 1, 0]], bool), 4)
  members = jax.random.normal(jax.random.PRNGKey(7), (1, 4, 3, 5))
  term = boundaries.dtp_gradient(jnp.full((1, 8), 0.3), grp.close_BxT, members, grp,
                                 jnp.ones((1, 8), jnp.int32), 3)
  assert term.shape == (1, 4, 5) and not np.asarray(term).any()


def test_entropy_head_trains_apart_from_the_trunk_unless_asked():
  """The entropy head's loss has no gradient in the states it reads (the
  trunk's output) by default (a stop-gradient copy, as BLT trains its entropy
  model apart), but does train its own head; `entropy_trains_trunk=True`
  restores the shared training."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16))
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 1, V)
  fine = scales.fine_scale(jnp.ones((2, 16), jnp.int32),
                           jnp.broadcast_to(jnp.arange(16), (2, 16)))
  for shared in (False, True):
    source = boundaries.Source("entropy", 2, V, 128, layers.BlockConfig(16, 2, 32),
                               entropy_trains_trunk=shared)
    params = jax.jit(lambda r: source.init(r, tokens, x, fine, True, method=source.want)
                     )(jax.random.PRNGKey(6))["params"]

    def head_loss(p, x):
      _, sown = source.apply({"params": p}, tokens, x, fine, False, method=source.want,
                             mutable=[boundaries.LOSSES])
      return sum(jax.tree_util.tree_leaves(sown[boundaries.LOSSES]))

    to_params, to_states = jax.jit(jax.grad(head_loss, argnums=(0, 1)))(params, x)
    assert max(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(to_params)) > 0
    assert (float(jnp.abs(to_states).sum()) > 0) == shared, shared


def test_dynamic_routing_smoothing_and_ratio_loss():
  """H-Net's pieces on their own: the smoothing is the recurrence
  z~_g = P_g z_g + (1 - P_g) z~_{g-1}; the ratio loss is 1 at the target
  rate and larger away from it; the routing probability is 1 at a
  document's first byte and (1 - cos) / 2 elsewhere."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 6, 3)).astype(np.float32)
  p = rng.uniform(size=(2, 6)).astype(np.float32)
  p[:, 0] = 1.0
  want = np.zeros_like(z)
  for g in range(6):
    want[:, g] = p[:, g, None] * z[:, g] + (1 - p[:, g, None]) * (want[:, g - 1] if g else 0)
  np.testing.assert_allclose(np.asarray(boundaries.smooth(jnp.asarray(z), jnp.asarray(p))),
                             want, rtol=1e-5, atol=1e-6)
  real = jnp.ones((1, 40), bool)
  at_target = boundaries.ratio_loss(jnp.arange(40)[None] % 4 == 0, jnp.full((1, 40), 0.25),
                                    real, 4)
  too_many = boundaries.ratio_loss(jnp.ones((1, 40), bool), jnp.full((1, 40), 0.9), real, 4)
  assert abs(float(at_target) - 1.0) < 1e-6 and float(too_many) > 2.0
