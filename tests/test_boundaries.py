"""Content-dependent groups (hiertx.boundaries): the close rules and the
learned predictor's rate. Leak, Jacobian (including that a coarse vector is
used exactly from its group's last byte on), packing, decoding and blockwise
tests run on the tiny `hourglass_whitespace/entropy/learned` and
`top_down_learned` variants with every other model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from hiertx import boundaries, layers, models, scales, steps
import tiny_models
from tiny_models import V, model_cfg


def _rules(want, pos, seg, k=4, capacity=1.0, max_group=5):
  keep, drop, forced = boundaries.close_groups(jnp.asarray(want), jnp.asarray(pos),
                                               jnp.asarray(seg), k=k, capacity=capacity,
                                               max_group=max_group)
  assert not (np.asarray(forced) & np.asarray(want)).any()  # forced: closes nobody wanted
  return np.asarray(keep), np.asarray(drop), np.asarray(forced)


def test_close_rules_per_document():
  """Longest group, budget and document starts, on hand-made rows."""
  t = 16
  pos, seg = np.arange(t)[None], np.ones((1, t), np.int32)
  # Nothing wanted: a group closes after every max_group bytes.
  keep, drop, forced = _rules(np.zeros((1, t), bool), pos, seg, capacity=2.0)
  assert np.flatnonzero(keep[0]).tolist() == [4, 9, 14] and not drop.any()
  assert (forced == keep).all()
  # Everything wanted, capacity 1 at k=4: at most (pos + 1) // 4 groups by pos.
  keep, drop, forced = _rules(np.ones((1, t), bool), pos, seg)
  assert np.flatnonzero(keep[0]).tolist() == [3, 7, 11, 15]
  assert drop.sum() == t - 4 and not forced.any()
  # A second document starting at 6 restarts both counts; padding never closes.
  seg2 = np.where(np.arange(t) < 6, 1, 2)[None].astype(np.int32)
  seg2[0, 14:] = 0
  pos2 = np.where(np.arange(t) < 6, np.arange(t), np.arange(t) - 6)[None]
  pos2[0, 14:] = 0
  keep, drop, _ = _rules(np.ones((1, t), bool), pos2, seg2)
  assert np.flatnonzero(keep[0]).tolist() == [3, 9, 13]
  assert not (keep | drop)[0, 14:].any()
  # The budget sums to at most the slots of the row: every close has a slot.
  for cap in (1.0, 1.5, 2.5):
    keep, _, _ = _rules(np.ones((1, 64), bool), np.arange(64)[None],
                        np.ones((1, 64), np.int32), capacity=cap)
    assert keep.sum() == boundaries.num_slots(64, 4, cap)
  # No rules (H-Net's dynamic chunking): the closes are the wishes, T slots.
  want = np.random.default_rng(0).uniform(size=(2, t)) < 0.3
  want[:, 0] = True
  keep, drop, forced = _rules(want, np.broadcast_to(pos, (2, t)), np.ones((2, t), np.int32),
                              capacity=0.0, max_group=0)
  assert (keep == want).all() and not drop.any() and not forced.any()
  assert boundaries.num_slots(t, 4, 0.0) == t


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
  members, _ = boundaries.window(jax.random.normal(jax.random.PRNGKey(7), (1, 8, 5)),
                                 grp.end_BxG, grp.prev_end_BxG, jnp.ones((1, 8), jnp.int32), 3)
  term = boundaries.dtp_gradient(jnp.full((1, 8), 0.3), members, grp,
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
  restart = np.zeros((2, 6), bool)
  restart[:, 0] = True
  np.testing.assert_allclose(np.asarray(boundaries.smooth(jnp.asarray(z), jnp.asarray(p),
                                                          jnp.asarray(restart))),
                             want, rtol=1e-5, atol=1e-6)
  real = jnp.ones((1, 40), bool)
  at_target = boundaries.ratio_loss(jnp.arange(40)[None] % 4 == 0, jnp.full((1, 40), 0.25),
                                    real, 4)
  too_many = boundaries.ratio_loss(jnp.ones((1, 40), bool), jnp.full((1, 40), 0.9), real, 4)
  assert abs(float(at_target) - 1.0) < 1e-6 and float(too_many) > 2.0


def _agree(got, want, what):
  """Cosine >= 0.999 and max error <= 1e-4 of the largest entry."""
  got, want = np.ravel(np.asarray(got, np.float64)), np.ravel(np.asarray(want, np.float64))
  cos = got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30)
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
  assert cos >= 0.999 and err <= 1e-4, (what, cos, err)


def _dtp_pool(logit_BxT, x_BxTxD, groups):
  """Dynamic Token Pooling's mean pooling as its paper (Nawrot et al. 2023,
  section 3) and reference code define it, written here apart from hiertx:
  straight-through boundaries b = hard + soft - sg(soft); position l belongs
  to group sum_{j<l} b_j; a group is the normalised sum of its members, the
  membership weight 1 - (g - s_l) kept only where g = s_l."""
  soft = jax.nn.sigmoid(logit_BxT)
  # (soft - sg(soft)) first: exactly zero in value, so the memberships are exact.
  b = (soft > 0.5).astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))
  s_BxT = jnp.cumsum(b, axis=1) - b
  offset = jnp.arange(groups, dtype=jnp.float32)[None, None] - s_BxT[..., None]
  member_BxTxS = jnp.where(offset == 0, 1.0 - offset, 0.0)
  member_BxTxS = member_BxTxS / (member_BxTxS.sum(1, keepdims=True) + 1e-9)
  return jnp.einsum("btd,bts->bsd", x_BxTxD, member_BxTxS)


def test_learned_boundaries_get_dtps_gradient():
  """boundaries=learned, both predictors: the pooled groups and the
  gradient at every boundary logit equal Dynamic Token Pooling's (the test's
  own `_dtp_pool`) on random rows (cosine >= 0.999, error <= 1e-4), the
  rules never binding; and the gradient does not change when 3 is added to
  every state (DTP's centred pooling; the layernorm predictor reads the same
  logits either way)."""
  b, t, d, k = 4, 24, 16, 3
  cfg = layers.BlockConfig(d, 2, 32)
  pool = scales.Pool("mean", k, cfg)
  fine = scales.fine_scale(jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)))
  tokens = jnp.ones((b, t), jnp.int32)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
  for predictor in boundaries.PREDICTORS:
    sh = boundaries.Shortening("learned", k, V, 128, cfg, max_group=t, capacity=float(k),
                               temperature=0.0, prior_weight=0.0, predictor=predictor)
    params = sh.init(jax.random.PRNGKey(1), x, fine, tokens, pool, True)["params"]
    logit = sh.apply({"params": params}, x, method=lambda m, x: m.source._logit(x))
    # About half the positions close (DTP's ReLU predictor starts all positive).
    params["source"]["out"]["bias"] -= jnp.median(logit)
    cot = jax.random.normal(jax.random.PRNGKey(2), (b, sh.slots(t), d))

    def ours(delta, x):
      z, coarse, _, _ = sh.apply({"params": params, "perturbations": {"source": {
          "boundary_logit": delta}}}, x, fine, tokens, pool, False,
          mutable=[boundaries.LOSSES, boundaries.STATS])[0]
      used = (coarse.seg_BxL > 0)[..., None]
      return (z * cot * used).sum(), z * used

    logit = sh.apply({"params": params}, x, method=lambda m, x: m.source._logit(x))
    closes = np.asarray(logit > 0).sum(1)
    assert closes.min() >= 3 and (t - closes).min() >= 3, closes  # groups of several bytes

    def reference(logit):
      pooled = _dtp_pool(logit, x, sh.slots(t))
      used = (jnp.arange(sh.slots(t))[None] < jnp.asarray(closes)[:, None])[..., None]
      return (pooled * cot * used).sum(), pooled * used

    (grad, z), (ref_grad, ref_z) = (jax.grad(ours, has_aux=True)(jnp.zeros((b, t)), x),
                                    jax.grad(reference, has_aux=True)(logit))
    np.testing.assert_allclose(np.asarray(z), np.asarray(ref_z), atol=1e-5)
    _agree(grad, ref_grad, predictor)
    if predictor == "layernorm":
      shifted = jax.grad(ours, has_aux=True)(jnp.zeros((b, t)), x + 3.0)[0]
      _agree(shifted, grad, "shifted by 3")


def _hnet_layer(x_BxTxD, p, inner_w):
  """One H-Net chunking layer (Hwang et al. 2025, equations 4-9), written
  here apart from hiertx, on rows that are one document each: h = RMSNorm(x);
  p_t = (1 - cos(W_q h_t, W_k h_{t-1})) / 2 (1 at t = 0); b_t = p_t > 1/2;
  the chunks are h at the boundaries; the main network (here tanh(z W)) runs
  on them; the dechunk EMA z~_c = P_c y_c + (1 - P_c) z~_{c-1} (P clamped to
  [1e-4, 1 - 1e-4], z~_{-1} = 0) is plugged back at every position of its
  chunk, times STE(max(p_t, 1 - p_t)), plus the residual projection of h."""
  h = x_BxTxD * jax.lax.rsqrt((x_BxTxD ** 2).mean(-1, keepdims=True) + 1e-5) * p["norm"]["scale"]
  q, k = h @ p["source"]["route_q"]["kernel"], h @ p["source"]["route_k"]["kernel"]
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  cos = (q[:, 1:] * k[:, :-1]).sum(-1)
  prob = jnp.concatenate([jnp.ones_like(cos[:, :1]), jnp.clip((1 - cos) / 2, 0, 1)], axis=1)
  boundary = np.asarray(jax.lax.stop_gradient(prob)) > 0.5
  c = jnp.maximum(prob, 1 - prob)
  ste = 1 + c - jax.lax.stop_gradient(c)
  residual = h @ p["residual_proj"]["kernel"] + p["residual_proj"]["bias"]
  rows = []
  for r in range(x_BxTxD.shape[0]):
    idx = np.flatnonzero(boundary[r])
    y = jnp.tanh(h[r, idx] @ inner_w)
    weight = jnp.clip(prob[r, idx], 1e-4, 1 - 1e-4)
    out, prev = [], jnp.zeros_like(y[0])
    for ci in range(len(idx)):
      prev = weight[ci] * y[ci] + (1 - weight[ci]) * prev
      out.append(prev)
    plug = np.cumsum(boundary[r]) - 1
    rows.append(jnp.stack(out)[plug] * ste[r, :, None] + residual[r])
  return jnp.stack(rows), boundary


def test_dynamic_is_hnets_chunking():
  """boundaries=dynamic against the test's own H-Net layer (`_hnet_layer`):
  the output and the gradients to the states, the RMSNorm, both routing
  projections, the residual projection and the inner network agree (cosine
  >= 0.999, error <= 1e-4) with random parameters; the residual projection
  starts at zero in float32 and, with no rules, every close is the router's."""
  b, t, d, k = 3, 20, 16, 2
  cfg = layers.BlockConfig(d, 2, 32)
  pool, up = scales.Pool("mean", k, cfg), scales.Upsample("repeat", k, cfg)
  fine = scales.fine_scale(jnp.ones((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(t), (b, t)))
  tokens = jnp.ones((b, t), jnp.int32)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
  # States that repeat for a few positions, so that chunks span several bytes.
  x = x[:, jnp.arange(t) // 3 * 3] + 0.4 * x
  sh = boundaries.Shortening("dynamic", k, V, 128, cfg, max_group=0, capacity=0.0,
                             ratio_weight=0.0)
  inner_w = jax.random.normal(jax.random.PRNGKey(3), (d, d)) / np.sqrt(d)
  cot = jax.random.normal(jax.random.PRNGKey(4), (b, t, d))

  def layer(m, x, inner_w):
    z, coarse, latest, route = m(x, fine, tokens, pool, False)
    return m.upsample(up, x, jnp.tanh(z @ inner_w), latest, fine, coarse, route, False)

  params = nn.unbox(sh.init(jax.random.PRNGKey(1), x, inner_w, method=layer)["params"])
  res = params["residual_proj"]["kernel"]
  assert res.dtype == jnp.float32 and not np.asarray(res).any()
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
  params = jax.tree_util.tree_map(
      lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape, a.dtype), params)

  def ours(params, x, inner_w):
    (out, sown) = sh.apply({"params": params}, x, inner_w, method=layer,
                           mutable=[boundaries.LOSSES, boundaries.STATS, layers.DECODE])
    return (out * cot).sum(), (out, sown[layers.DECODE]["closes"])

  def reference(params, x, inner_w):
    out, boundary = _hnet_layer(x, params, inner_w)
    return (out * cot).sum(), (out, boundary)

  (g, (out, closes)) = jax.grad(ours, argnums=(0, 1, 2), has_aux=True)(params, x, inner_w)
  (rg, (ref_out, ref_closes)) = jax.grad(reference, argnums=(0, 1, 2), has_aux=True)(
      params, x, inner_w)
  assert (np.asarray(closes) == ref_closes).all()
  assert 0.2 < ref_closes.mean() < 0.8, ref_closes.mean()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g),
                               jax.tree_util.tree_leaves(rg)):
    _agree(got, want, jax.tree_util.keystr(path))


def test_positions_before_their_documents_first_group_read_dtps_null_group():
  """learned (DTP): a position before its document's first group receives the
  null group's coarse output, every other position its last closed group of
  its own document; in hourglass and top_down (each runs its own coarse level
  on the null) the first position of every document reads it. Without the
  null group there is no such parameter and such a position receives zero."""
  # Two documents, [0, 4) and [4, 8); groups close at 1 and 6.
  z_1xGxD = jnp.arange(1, 4, dtype=jnp.float32)[None, :, None] * jnp.ones((1, 3, 2))
  latest = jnp.asarray([[-1, 0, 0, 0, 0, 0, 1, 1]])
  fine = scales.Scale(jnp.asarray([[1] * 4 + [2] * 4]), ((8, 1, 0),))
  coarse = scales.Scale(jnp.asarray([[1, 2, 0]]), ((3, 1, 0),))
  null = jnp.asarray([-5.0, 7.0])
  got = np.asarray(scales.upsample_latest(z_1xGxD, latest, coarse, fine, null))[0]
  want = [null, [1, 1], [1, 1], [1, 1], null, null, [2, 2], [2, 2]]
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))
  got = np.asarray(scales.upsample_latest(z_1xGxD, latest, coarse, fine))[0]
  np.testing.assert_array_equal(got[[0, 4, 5]], 0.0)

  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 24), 1, V)
  seg = jnp.ones((2, 24), jnp.int32).at[:, 9:].set(2)  # two documents per row
  pos = jnp.concatenate([jnp.arange(9), jnp.arange(15)])[None].repeat(2, 0)
  for key in ("hourglass_learned", "top_down_learned"):
    model = models.build(model_cfg(key, attention="dense"), V, 64)
    params = nn.unbox(tiny_models.params(key))
    run = jax.jit(lambda p: model.apply({"params": p}, tokens, seg, pos))
    moved = dict(params, content_groups=dict(params["content_groups"]))
    # (not a constant shift: every LayerNorm downstream would remove it)
    moved["content_groups"]["null_group"] = jax.random.normal(jax.random.PRNGKey(5), (16,))
    changed = np.abs(np.asarray(run(moved) - run(params))).max(-1) > 1e-4
    assert changed[:, [0, 9]].all(), (key, changed)
    bare = models.build(model_cfg(key, boundary_null_group=False), V, 64)
    shapes = jax.eval_shape(bare.init, jax.random.PRNGKey(0), tokens)["params"]
    assert "null_group" not in shapes["content_groups"]


def test_learned_with_noise_evaluates_by_sampling_as_dtp():
  """learned with Gumbel noise (temperature > 0): evaluation and decoding
  draw the noise as training does (DTP samples at evaluation too), so a
  logit c closes with probability sigmoid(c) there as in training, not at
  a threshold the noise-trained logits sit below. The draw is fixed per
  document position: a document's groups do not depend on where its row
  packs it. `boundary_eval="threshold"` closes where the logit is above 0.
  (Cached decoding against the forward pass: test_decode's equality tests
  run hourglass_learned and top_down_learned, which have noise.)"""
  pos = jnp.arange(20000)
  noise = np.asarray(boundaries.position_noise(pos))
  np.testing.assert_array_equal(noise, np.asarray(boundaries.position_noise(pos)))
  for c in (-2.0, 0.0, 1.5):
    share = (c + noise > 0).mean()
    assert abs(share - 1 / (1 + np.exp(-c))) < 0.012, (c, share)

  tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 40), 1, V)
  alone = (tokens, jnp.ones((1, 40), jnp.int32), jnp.arange(40)[None])
  # The same 30 bytes as a second document, after 10 bytes of another.
  packed = (jnp.concatenate([tokens[:, 30:], tokens[:, :30]], 1),
            jnp.ones((1, 40), jnp.int32).at[:, 10:].set(2),
            jnp.concatenate([jnp.arange(10), jnp.arange(30)])[None])
  params = nn.unbox(tiny_models.params("hourglass_learned"))
  closes = {}
  for how in boundaries.EVALS:
    model = models.build(model_cfg("hourglass_learned", attention="dense", boundary_eval=how),
                         V, 64)
    for name, (t, s, p) in (("alone", alone), ("packed", packed)):
      _, sown = model.apply({"params": params}, t, s, p, mutable=["decode"])
      closes[how, name] = np.asarray(sown["decode"]["content_groups"]["closes"])[0]
    np.testing.assert_array_equal(closes[how, "alone"][:30], closes[how, "packed"][10:])
  assert (closes["sample", "alone"] != closes["threshold", "alone"]).any()
