"""Causality and sensitivity of every model (docs/design.md section 2)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import models
from hiertx.models import retina
import tiny_models
from tiny_models import MODELS, V, model_cfg


def length(key: str) -> int:
  """A length with remainder k^S - 1 past a whole number of the model's pooling
  groups (so the last group is incomplete), long enough that retina has several
  complete blocks at every level."""
  m = models.build(model_cfg(key), V, 64).pooling_multiple()
  if MODELS[key]["name"] == "retina":
    return 23
  return -(-12 // m) * m + m - 1


CASES = [(key, length(key)) for key in sorted(MODELS)]


@functools.lru_cache(maxsize=None)
def _built(key, t, overrides):
  model = models.build(model_cfg(key, **dict(overrides)), V, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(t), (2, t), 1, V)
  # The perturbation points (zeros) have the input's length; the parameters not.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), tokens)
  perturbations = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                         shapes.get("perturbations", {}))
  return model, {"params": tiny_models.params(key, **dict(overrides)),
                 "perturbations": perturbations}, tokens


def build(key, t, with_perturbations=False, **overrides):
  """A tiny model, its random parameters and tokens (cached across tests)."""
  model, variables, tokens = _built(key, t, tuple(sorted(overrides.items())))
  if with_perturbations:
    return model, variables["params"], tokens, variables["perturbations"]
  return model, variables["params"], tokens


def changed(tokens, where):
  """`tokens` with the positions in `where` (bool mask or index) set to other tokens."""
  return jnp.where(where, tokens % (V - 1) + 1, tokens)


@pytest.mark.parametrize("key,t", CASES)
def test_prefix_invariance(key, t):
  """Changing x_j leaves outputs < j unchanged and changes the output at j."""
  model, params, tokens = build(key, t)
  # Variant j changes token j; variant t changes nothing and is the baseline,
  # computed in the same batch so that equal prefixes give equal numbers.
  variants = jax.vmap(lambda j: changed(tokens, jnp.arange(t) == j))(jnp.arange(t + 1))
  outs = jax.jit(jax.vmap(lambda x: model.apply({"params": params}, x)))(variants)
  base = outs[t]
  assert base.shape == (2, t, V)
  for j in range(t):
    np.testing.assert_allclose(outs[j][:, :j], base[:, :j], atol=1e-6, rtol=0,
                               err_msg=f"{key}: output before {j} changed")
    assert float(jnp.abs(outs[j][:, j] - base[:, j]).max()) > 1e-4, (
        f"{key}: output {j} ignores x_{j}")


def _jacobian_norms(model, params, tokens, pert, *names):
  """|d logits_t / d perturbation[name]_j| summed over vocabulary and width:
  [T, L_name] for each name (one name: the array alone)."""
  tokens = tokens[:1]
  pert = jax.tree_util.tree_map(lambda x: x[:1], pert)

  def logits_of(p):
    return model.apply({"params": params, "perturbations": p}, tokens)[0]  # [T, V]

  jac = jax.jit(jax.jacrev(logits_of))(pert)
  out = [np.asarray(jnp.abs(jac[n][:, :, 0]).sum(axis=(1, 3))) for n in names]  # [T, V, L, D]
  return out[0] if len(names) == 1 else tuple(out)


@pytest.mark.parametrize("key,t", CASES)
def test_jacobian_is_exactly_causal_and_every_past_token_reaches(key, t):
  """For every output position t and every input embedding j, padding included:
  d out_t / d emb_j is exactly 0 for j > t and non-zero for every j <= t.

  Content groups (hiertx.boundaries), from the same Jacobian: output t
  depends on coarse slot g iff g is a group closed at or before t (its last
  byte <= t): exactly zero otherwise, non-zero for every one of them."""
  model, params, tokens, pert = build(key, t, with_perturbations=True)
  if model.content:
    norms, coarse = _jacobian_norms(model, params, tokens, pert, "embeddings", "coarse_1")
  else:
    norms = _jacobian_norms(model, params, tokens, pert, "embeddings")  # [t, padded length]
  assert norms.shape[1] >= t
  future = np.triu(np.ones_like(norms, bool), k=1)
  assert np.all(norms[future] == 0.0), f"{key}: future leaks at {np.argwhere(norms * future)}"
  past = ~future
  assert np.all(norms[past] > 0), (
      f"{key}: past inputs not reaching {np.argwhere(past & (norms == 0))}")
  if model.content:
    _, sown = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["decode"]))(
        params, tokens[:1])
    closes = np.asarray(sown["decode"]["content_groups"]["closes"][0])
    assert 1 < closes.sum() < t, closes  # content decided some groups, not all
    latest = np.cumsum(closes) - 1
    allowed = np.arange(coarse.shape[1])[None, :] <= latest[:, None]  # [t, slots]
    assert np.all(coarse[~allowed] == 0.0), f"{key}: a group used before it closed"
    assert np.all(coarse[allowed] > 0), f"{key}: unused at {np.argwhere(allowed & (coarse == 0))}"


COARSE = ["bottom_up", "bottom_up_attn_pool", "top_down", "top_down_linear",
          "top_down_attention", "hourglass", "hourglass_attention"]


def _scale_factors(model) -> dict[str, int]:
  """Perturbation name of each coarse scale -> its total pooling factor K_s."""
  if isinstance(model, models.HourglassLM):
    factors = model.levels[2]
    return {f"coarse_{i}": f for i, f in enumerate(factors) if i}
  return {f"coarse_{s}": model.factor(s) for s in range(1, len(model.pool_factors) + 1)}


@pytest.mark.parametrize("key", COARSE)
def test_coarse_vectors_are_used_as_soon_as_the_rule_allows(key):
  """Output t depends on coarse vector g of scale s iff g <= floor(t / K_s): a
  vector is used from the first position it may be (not one group staler) and
  never earlier."""
  t = length(key)
  model, params, tokens, pert = build(key, t, with_perturbations=True)
  for name, k in _scale_factors(model).items():
    norms = _jacobian_norms(model, params, tokens, pert, name)  # [t, coarse length]
    allowed = np.arange(norms.shape[1])[None, :] <= np.arange(t)[:, None] // k
    assert np.all(norms[~allowed] == 0.0), f"{key} {name}: used before its group ends"
    assert np.all(norms[allowed] > 0), (
        f"{key} {name}: unused where allowed at {np.argwhere(allowed & (norms == 0))}")


@pytest.mark.parametrize("impl", ["chunked", "dense"])
def test_retina_reaches_far_past_through_coarse_blocks(impl):
  """With one layer and small windows, token 0 reaches t=31 only via pooled keys."""
  model, params, tokens = build("retina", 32, num_layers=1, windows=(2, 2), chunk_size=8,
                                implementation=impl)
  apply = jax.jit(model.apply)
  base = apply({"params": params}, tokens)
  out = apply({"params": params}, changed(tokens, jnp.arange(32) == 0))
  assert float(jnp.abs(out - base)[:, 31].max()) > 1e-5


def _walk_regions(t: int, k: int, windows) -> list[list[int]]:
  """Retina's key blocks for query t by walking back from t (independent of
  `retina.region_bounds`): at level s take w_s blocks of k^s, then more until
  the boundary sits on the grid of k^{s+1}; the coarsest level takes the rest.
  Returns, per level, the end positions of its blocks."""
  out, boundary = [], t
  for s, w in enumerate(windows):
    size, taken, level = k ** s, 0, []
    while boundary >= 0 and (taken < w or boundary % (size * k)):
      level.append(boundary)
      boundary -= size
      taken += 1
    out.append(level)
  size = k ** len(windows)
  out.append(list(range(boundary - boundary % size, -1, -size)) if boundary >= 0 else [])
  return out


@pytest.mark.parametrize("k,windows", [(2, (3, 2)), (3, (1, 1, 2)), (4, (5,)), (2, (1,))])
def test_retina_mask_is_the_enumerated_regions(k, windows):
  """The mask retina's dense path uses (and its chunked path equals) selects
  exactly the blocks an independent walk finds, and those cover [0, t] once."""
  length = k ** len(windows) * 6
  mask = retina.levels_mask(length, k, windows)
  offsets = np.cumsum([0] + [length // k ** s for s in range(len(windows) + 1)])
  for t in range(length):
    regions = _walk_regions(t, k, windows)
    covered = np.zeros(length, int)
    for s, ends in enumerate(regions):
      got = np.nonzero(mask[t, offsets[s]:offsets[s + 1]])[0] * k ** s
      assert sorted(got) == sorted(ends), (t, s, sorted(got), sorted(ends))
      for e in ends:
        covered[max(0, e - k ** s + 1):e + 1] += 1
    assert np.all(covered[:t + 1] == 1) and not covered[t + 1:].any(), t


@pytest.mark.parametrize("key,scan", [("vanilla", False), ("retina", True)])
def test_rematerialisation_keeps_the_gradients(key, scan):
  """remat=block|dots recomputes activations; gradients must not change."""
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 13), 1, V)
  grads = {}
  policies = ("none", "block", "dots") if key == "vanilla" else ("none", "block")
  params = tiny_models.params(key, scan_layers=scan)
  for policy in policies:
    model = models.build(model_cfg(key, remat=policy, scan_layers=scan), V, 64)
    grads[policy] = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))(params)
  for policy in policies[1:]:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           grads[policy], grads["none"])


def _stack_unrolled(tree):
  """Unrolled parameters (block_0, block_1, ...) in the layout `scan_layers` uses."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _stack_unrolled(v) for k, v in tree.items() if not k.startswith("block_")}
  blocks = sorted((k for k in tree if k.startswith("block_")), key=lambda k: int(k[6:]))
  if blocks:
    out["blocks"] = {"block": jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *[_stack_unrolled(tree[k]) for k in blocks])}
  return out


@pytest.mark.parametrize("key", ["bottom_up", "retina", "hourglass"])
def test_scanned_blocks_compute_what_unrolled_blocks_do(key):
  model, params, tokens = build(key, length(key))
  scanned = models.build(model_cfg(key, scan_layers=True), V, 64)
  want = jax.jit(model.apply)({"params": params}, tokens)
  got = jax.jit(scanned.apply)({"params": _stack_unrolled(nn.unbox(params))}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["vanilla", "retina"])
def test_remat_of_scanned_blocks_lowers_xla_memory(key):
  """The point of remat: fewer bytes kept for the backward pass (compile only)."""
  tokens = jnp.zeros((4, 64), jnp.int32)
  temp = {}
  for policy in ("none", "block"):
    model = models.build(model_cfg(key, num_layers=6, remat=policy, scan_layers=True), V, 64)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
    temp[policy] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp["block"] < 0.6 * temp["none"], temp


@pytest.mark.parametrize("key", sorted(MODELS))
def test_packed_documents(key):
  """Rows of 40 with documents packed (one compiled function for both checks).

  Off the grid: three documents, one a single token, boundaries off every
  pooling grid; changing one document changes its own outputs and no other's.
  On the grid (as hiertx.data packs, every document starting at a multiple of
  the model's pooling factor): a document's logits equal its logits alone,
  wherever it sits in the row.
  """
  t = 40
  model, params, tokens = build(key, t)
  apply = jax.jit(lambda x, s, p: model.apply({"params": params}, x, s, p))

  def layout(starts, end):
    """Segment ids and within-document positions of a row whose documents
    start at `starts` and whose padding starts at `end`."""
    i = np.arange(t)
    seg = np.where(i < end, np.searchsorted(starts, i, side="right"), 0)
    pos = i - np.asarray(starts)[np.maximum(seg - 1, 0)]
    return seg, pos

  rows = [layout([0, 5, 6], 16), layout([0, 7, 16], 17)]
  seg, pos = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  base = apply(tokens, seg, pos)
  for doc in (1, 2, 3):
    inside = np.asarray(seg == doc)
    out = apply(changed(tokens, seg == doc), seg, pos)
    diff = np.asarray(jnp.abs(out - base).max(-1))
    assert np.all(diff[(~inside) & (np.asarray(seg) != 0)] <= 1e-6), f"{key}: doc {doc} leaks"
    assert np.all(diff[inside] > 1e-4), f"{key}: doc {doc}'s own outputs ignore it"

  m = model.pooling_multiple()
  doc = tokens[0, :11]
  alone = jax.jit(lambda x: model.apply({"params": params}, x))(tokens[:, :11])[0]
  for offset in sorted({0, m, 2 * m, 3 * m, 24 // m * m}):
    seg_pos = [layout([0], 11), layout([0, offset] if offset else [0], offset + 11)]
    seg, pos = (jnp.asarray(np.stack(x)) for x in zip(*seg_pos))
    row = tokens.at[1, offset:offset + 11].set(doc)
    out = apply(row, seg, pos)
    # First in a row, padding after it: as alone (generation's view).
    np.testing.assert_allclose(out[0, :11], alone, atol=2e-6, rtol=0)
    np.testing.assert_allclose(out[1, offset:offset + 11], alone, atol=2e-6, rtol=0,
                               err_msg=f"offset {offset}")


def test_projections_contract_one_token_axis():
  """`over_tokens` gives the batched einsum's numbers, and the weight
  gradient it leads to contracts one token axis, not batch and length (the
  form XLA:CPU's matmul library takes; docs/performance.md, "Tokens as one axis")."""
  from hiertx import layers
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
  w_DxF = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  project = lambda w: layers.over_tokens(lambda x_NxD: x_NxD @ w, x_BxLxD)
  np.testing.assert_allclose(project(w_DxF), jnp.einsum("bld,df->blf", x_BxLxD, w_DxF),
                             rtol=1e-6)
  grad_text = jax.jit(jax.grad(lambda w: jnp.sum(project(w) ** 2))).lower(w_DxF).as_text()
  contractions = re.findall(r"contracting_dims = \[([\d, ]*)\]", grad_text)
  assert contractions and all("," not in dims for dims in contractions), contractions


def test_initialisations_are_the_configured_ones():
  """model.weight_init: LeCun's truncated normal (variance 1/fan_in) or
  PyTorch nn.Linear's uniform on +-1/sqrt(fan_in); model.position_init: the
  learned positions' standard deviation (0.02, or 1.0 as nn.Embedding)."""
  def params(**kw):
    model = models.build(dict(name="hourglass", hierarchy="1@1 1@2 1@1", d_model=64,
                              num_heads=4, mlp_dim=256, max_len=512, **kw), V, 64)
    return nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"])

  lecun, torch = params(), params(weight_init="torch", position_init=1.0)
  for p, bound_std in ((lecun, None), (torch, 1 / np.sqrt(3))):
    wi = np.asarray(p["pre_0"]["block_0"]["mlp"]["wi"]["kernel"])  # fan_in 64
    query = np.asarray(p["pre_0"]["block_0"]["attn"]["query"])  # [D, H, K], fan_in 64
    for w in (wi, query):
      std = w.std() * np.sqrt(64)
      if bound_std is None:  # cut at 2 sigma of a normal widened to keep the variance
        assert abs(std - 1) < 0.05 and np.abs(w).max() <= 2 / (0.8796 * np.sqrt(64))
      else:
        assert abs(std - bound_std) < 0.03 and np.abs(w).max() <= 1 / np.sqrt(64)
    out = np.asarray(p["pre_0"]["block_0"]["mlp"]["wo"]["kernel"])  # fan_in 256
    assert abs(out.std() * 16 - (bound_std or 1)) < 0.03
  assert abs(np.asarray(lecun["embed"]["position"]).std() - 0.02) < 0.002
  assert abs(np.asarray(torch["embed"]["position"]).std() - 1.0) < 0.05
  with pytest.raises(Exception, match="model.weight_init: 'xavier' is not one of"):
    params(weight_init="xavier")
