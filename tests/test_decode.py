"""Cached token-by-token decoding equals the full forward pass, for every model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import decode, models
from hiertx.models import retina
import tiny_models
from tiny_models import MODELS, V, model_cfg
# Cached vs full logits in float32: the same operations in other summation
# orders (one query against a cache, instead of blockwise over the sequence).
ATOL, RTOL = 1e-5, 1e-5

# retina_dense decodes through the same code as retina (the masks are equal).
DECODABLE = sorted(k for k in MODELS if k != "retina_dense")


@functools.lru_cache(maxsize=None)
def _setup(key, scan):
  model = models.build(model_cfg(key, scan_layers=scan), V, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 25), 1, V)
  return model, tiny_models.params(key, scan_layers=scan), tokens


@functools.lru_cache(maxsize=None)  # one compiled continuation per decoder and length
def continuation(dec, steps):
  """Jitted: `steps` cached steps from `state`, feeding tokens[:, start:start+steps]."""
  @jax.jit
  def run(params, state, tokens_BxN, start):
    def body(state, inp):
      token_B, t = inp
      return dec.step(params, state, token_B, t)
    _, logits_NxBxV = jax.lax.scan(body, state, (tokens_BxN.T, start + jnp.arange(steps)))
    return logits_NxBxV.transpose(1, 0, 2)
  return run


def assert_trees_close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=ATOL, rtol=RTOL)


def check_token_by_token(dec, params, tokens_BxT, full_BxTxV, p):
  """Positions 0..p-1 fed one at a time, then the rest as cached steps, all equal
  to the full pass; returns the state after the first p positions."""
  state, logits_PxBxV = jax.jit(functools.partial(decode.feed, dec))(params, tokens_BxT[:, :p])
  np.testing.assert_allclose(logits_PxBxV.transpose(1, 0, 2), full_BxTxV[:, :p], atol=ATOL,
                             rtol=RTOL)
  cont = continuation(dec, tokens_BxT.shape[1] - p)
  np.testing.assert_allclose(cont(params, state, tokens_BxT[:, p:], p), full_BxTxV[:, p:],
                             atol=ATOL, rtol=RTOL)
  return state


@pytest.mark.parametrize("key", DECODABLE)
def test_cached_decoding_equals_the_full_forward_pass(key):
  """Every position of a 25-token sequence: the first 13 token by token, the
  rest continued from that state; and the same continuations after a parallel
  prompt pass of 13 tokens, and of 12 (divisible by every tiny model's k^S)
  where groups are fixed (a content-grouped model has no such multiple).
  The steps cross several coarse-block boundaries at every scale."""
  model, params, tokens = _setup(key, key in ("vanilla", "retina", "hourglass",
                                              "top_down_attention"))
  full = jax.jit(model.apply)({"params": params}, tokens)
  dec = decode.decoder(model, tokens.shape[1])
  state = check_token_by_token(dec, params, tokens, full, 13)
  cont = continuation(dec, 12)
  prefill = jax.jit(dec.prefill)
  for p in (12, 13) if model.pooling_multiple() > 1 else (13,):
    state_p, last_BxV = prefill(params, tokens[:, :p])
    np.testing.assert_allclose(last_BxV, full[:, p - 1], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(cont(params, state_p, tokens[:, p:p + 12], p),
                               full[:, p:p + 12], atol=ATOL, rtol=RTOL)
  # The parallel pass builds the very state the token-by-token steps build.
  assert_trees_close(state_p, state)


def test_prefill_refuses_a_prompt_longer_than_its_capacity():
  model, params, tokens = _setup("vanilla", True)
  dec = decode.decoder(model, 8)
  with pytest.raises(ValueError, match="25 tokens does not fit a decoder of capacity 8"):
    dec.prefill(params, tokens)


def test_retina_cache_is_bounded_by_its_windows():
  """Levels below the coarsest keep a fixed ring; only the coarsest grows (T / k^S)."""
  model = models.build(model_cfg("retina", windows=(3, 2), pool_factor=2, max_len=4096), V, 64)
  sizes = {c: retina.ring_sizes(2, (3, 2), c) for c in (256, 4096)}
  assert sizes[256][:2] == sizes[4096][:2] == [6, 8]
  assert (sizes[256][2], sizes[4096][2]) == (64, 1024)
  dec = decode.decoder(model, 4096)
  state = jax.eval_shape(lambda: dec.init(1))
  level_slots = [ring["kv"].shape[2] for ring in state["rings"]]
  assert level_slots == [6, 8, 1024]
  # Long enough that the rings wrap many times, still equal to the full pass;
  # also after a parallel prompt pass that leaves every ring wrapped.
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 61), 1, V)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  full = jax.jit(model.apply)({"params": params}, tokens)
  dec = decode.decoder(model, 61)
  state = check_token_by_token(dec, params, tokens, full, 37)
  state_p, _ = jax.jit(dec.prefill)(params, tokens[:, :37])
  assert_trees_close(state_p, state)
  np.testing.assert_allclose(continuation(dec, 24)(params, state_p, tokens[:, 37:], 37),
                             full[:, 37:], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("key", ["vanilla", "bottom_up_attn_pool", "top_down_attention",
                                 "hourglass", "retina_dense"])
def test_bfloat16_decoding_computes_in_the_models_precision(key):
  """With model.dtype=bfloat16 the caches hold bfloat16 and the cached logits
  equal the bfloat16 forward pass to bfloat16 rounding.

  The tolerance comes from the rounding itself: the float32 forward pass of
  the same parameters differs from the bfloat16 one by `gap` (the rounding of
  every bfloat16 activation, accumulated). A decoder that computed anything in
  another precision than the model would land about `gap` away; one that
  computes what the model computes differs only where a float32 accumulation
  in another order rounds to a neighbouring bfloat16 value. So: within
  gap / 4. (Retina's chunked forward pass merges two softmaxes, each rounded
  to bfloat16 on its own; its decoder is checked against the dense
  implementation, which computes one softmax as decoding does.)"""
  cfg = model_cfg(key)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 25), 1, V)
  f32 = models.build(cfg, V, 64)
  b16 = models.build({**cfg, "dtype": "bfloat16"}, V, 64)
  params = tiny_models.params(key)
  want = jax.jit(b16.apply)({"params": params}, tokens)
  gap = float(jnp.abs(jax.jit(f32.apply)({"params": params}, tokens) - want).max())
  dec = decode.decoder(b16, tokens.shape[1])
  state, logits_TxBxV = jax.jit(functools.partial(decode.feed, dec))(params, tokens)
  floats = {x.dtype for x in jax.tree_util.tree_leaves(state) if x.dtype != jnp.int32}
  assert floats == {jnp.dtype(jnp.bfloat16)}, floats
  err = float(jnp.abs(logits_TxBxV.transpose(1, 0, 2) - want).max())
  assert gap > 1e-3 and err <= gap / 4, (err, gap)
  state_p, _ = jax.jit(dec.prefill)(params, tokens[:, :13])
  state_f, _ = jax.jit(functools.partial(decode.feed, dec))(params, tokens[:, :13])
  for a, b in zip(jax.tree_util.tree_leaves(state_p), jax.tree_util.tree_leaves(state_f)):
    assert a.dtype == b.dtype
    assert float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) <= gap / 4
