"""Causality and sensitivity of every model (DESIGN.md section 2)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import models
from tiny_models import MODELS, model_cfg

V = 23
LENGTHS = (12, 13)  # 12 is divisible by every tiny model's k^S; 13 is not


@functools.lru_cache(maxsize=None)
def _built(key, t, overrides):
  model = models.build(model_cfg(key, **dict(overrides)), V, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(t), (2, t), 1, V)
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), tokens), tokens


def build(key, t, with_perturbations=False, **overrides):
  """A tiny model, its random parameters and tokens (cached across tests)."""
  model, variables, tokens = _built(key, t, tuple(sorted(overrides.items())))
  if with_perturbations:
    return model, variables["params"], tokens, variables["perturbations"]
  return model, variables["params"], tokens


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("key", sorted(MODELS))
def test_prefix_invariance(key, t):
  """Changing x_j leaves outputs < j unchanged and changes the output at j."""
  model, params, tokens = build(key, t)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  base = apply(params, tokens)
  assert base.shape == (2, t, V)
  for j in range(t):
    changed = tokens.at[:, j].set(tokens[:, j] % (V - 1) + 1)
    out = apply(params, changed)
    np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6, rtol=0,
                               err_msg=f"{key}: output before {j} changed")
    assert float(jnp.abs(out[:, j] - base[:, j]).max()) > 1e-4, f"{key}: output {j} ignores x_{j}"


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("key", sorted(MODELS))
def test_jacobian_upper_triangle_is_exactly_zero(key, t):
  """d out_t / d emb_j == 0 exactly for j > t, and != 0 for j == t."""
  model, params, tokens, pert = build(key, t, with_perturbations=True)
  tokens = tokens[:1]
  pert = jax.tree_util.tree_map(lambda x: x[:1], pert)

  def logits_of(pert):
    return model.apply({"params": params, "perturbations": pert}, tokens)[0]  # [T, V]

  jac = jax.jit(jax.jacrev(logits_of))(pert)["embeddings"][:, :, 0, :t]  # [T, V, T, D]
  norms = np.asarray(jnp.abs(jac).sum(axis=(1, 3)))  # [t_out, j_in]
  upper = np.triu(norms, k=1)
  assert np.all(upper == 0.0), f"{key}: future leaks into outputs at {np.argwhere(upper)}"
  assert np.all(np.diag(norms) > 0), f"{key}: some output ignores its own input"


@pytest.mark.parametrize("key", sorted(MODELS))
def test_packed_documents_do_not_see_each_other(key):
  """Changing document 1 leaves document 2's outputs unchanged, at every scale."""
  t = 13
  model, params, tokens = build(key, t)
  # Document boundaries that do not line up with any pooling grid.
  seg = jnp.array([[1] * 5 + [2] * 7 + [0], [1] * 7 + [2] * 6])
  pos = jnp.array([list(range(5)) + list(range(7)) + [0], list(range(7)) + list(range(6))])
  apply = jax.jit(lambda x: model.apply({"params": params}, x, seg, pos))
  base = apply(tokens)
  doc1 = seg == 1
  changed = jnp.where(doc1, tokens % (V - 1) + 1, tokens)
  out = apply(changed)
  doc2 = np.asarray(seg == 2)
  np.testing.assert_allclose(np.asarray(out)[doc2], np.asarray(base)[doc2], atol=1e-6, rtol=0)
  assert float(jnp.abs(out - base)[np.asarray(doc1)].max()) > 1e-4


def _zero_pools():
  from hiertx import scales  # noqa: PLC0415

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, scales.Pool) and context.method_name == "__call__":
      return jnp.zeros_like(out)
    return out
  return interceptor


@pytest.mark.parametrize("key", ["bottom_up", "top_down", "hourglass", "bottom_up_attn_pool",
                                 "hourglass_attention"])
def test_coarse_path_is_used(key):
  """Zeroing every pooled sequence changes the outputs."""
  import flax.linen as nn  # noqa: PLC0415

  model, params, tokens = build(key, 13)
  base = jax.jit(model.apply)({"params": params}, tokens)

  @jax.jit
  def without_pools(params, tokens):
    with nn.intercept_methods(_zero_pools()):
      return model.apply({"params": params}, tokens)

  cut = without_pools(params, tokens)
  assert float(jnp.abs(cut - base)[:, 4:].max()) > 1e-4


@pytest.mark.parametrize("impl", ["chunked", "dense"])
def test_retina_reaches_far_past_through_coarse_blocks(impl):
  """With one layer and small windows, token 0 reaches t=31 only via pooled keys."""
  model, params, tokens = build("retina", 32, num_layers=1, windows=(2, 2), chunk_size=8,
                                implementation=impl)
  apply = jax.jit(model.apply)
  base = apply({"params": params}, tokens)
  changed = apply({"params": params}, tokens.at[:, 0].set(tokens[:, 0] % (V - 1) + 1))
  assert float(jnp.abs(changed - base)[:, 31].max()) > 1e-5


def test_vanilla_reaches_far_past():
  model, params, tokens = build("vanilla", 13)
  apply = jax.jit(model.apply)
  base = apply({"params": params}, tokens)
  changed = apply({"params": params}, tokens.at[:, 0].set(tokens[:, 0] % (V - 1) + 1))
  assert float(jnp.abs(changed - base)[:, 12].max()) > 1e-5


@pytest.mark.parametrize("key,scan", [("vanilla", False), ("retina", True),
                                      ("bottom_up", True)])
def test_rematerialisation_keeps_the_gradients(key, scan):
  """remat=block|dots recomputes activations; gradients must not change."""
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 13), 1, V)
  grads = {}
  policies = ("none", "block", "dots") if key == "vanilla" else ("none", "block")
  for policy in policies:
    model = models.build(model_cfg(key, remat=policy, scan_layers=scan), V, 64)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
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
  model, params, tokens = build(key, 13)
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
