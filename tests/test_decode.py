"""Cached token-by-token decoding equals the full forward pass, for every model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import decode, models
from tiny_models import MODELS, model_cfg

V = 23
# Tolerance of cached vs full logits (float32; different summation orders).
ATOL = 2e-4

# retina_dense decodes through the same code as retina (the masks are equal).
DECODABLE = sorted(k for k in MODELS if k != "retina_dense")


@functools.lru_cache(maxsize=None)
def _setup(key, scan):
  model = models.build(model_cfg(key, scan_layers=scan), V, 64)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 25), 1, V)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  return model, params, tokens


def cached_logits(model, params, tokens_BxT, name):
  dec = decode.decoder(model, tokens_BxT.shape[1], name)

  @jax.jit
  def run(params, tokens_BxT):
    def body(state, inp):
      token_B, t = inp
      return dec.step(params, state, token_B, t)
    _, logits_TxBxV = jax.lax.scan(body, dec.init(tokens_BxT.shape[0]),
                                   (tokens_BxT.T, jnp.arange(tokens_BxT.shape[1])))
    return logits_TxBxV.transpose(1, 0, 2)
  return run(params, tokens_BxT)


@pytest.mark.parametrize("key", DECODABLE)
def test_cached_decoding_equals_the_full_forward_pass(key):
  """At every position of prompts of 24 tokens (divisible by every tiny model's
  k^S) and 25 (not), crossing several coarse-block boundaries at every scale."""
  model, params, tokens = _setup(key, key in ("vanilla", "retina", "hourglass",
                                              "top_down_attention"))
  cached = cached_logits(model, params, tokens, model_cfg(key)["name"])
  apply = jax.jit(model.apply)
  for length in (24, 25):
    full = apply({"params": params}, tokens[:, :length])
    np.testing.assert_allclose(cached[:, :length], full, atol=ATOL, rtol=1e-4)


def test_retina_cache_is_bounded_by_its_windows():
  """Levels below the coarsest keep a fixed ring; only the coarsest grows (T / k^S)."""
  model = models.build(model_cfg("retina", windows=(3, 2), pool_factor=2, max_len=4096), V, 64)
  sizes = {c: decode.retina_ring_sizes(2, (3, 2), c) for c in (256, 4096)}
  assert sizes[256][:2] == sizes[4096][:2] == [6, 8]
  assert (sizes[256][2], sizes[4096][2]) == (64, 1024)
  dec = decode.decoder(model, 4096, "retina")
  state = jax.eval_shape(lambda: dec.init(1))
  level_slots = [lv["kv"].shape[1] for lv in state["kv"][0]]
  assert level_slots == [6, 8, 1024]
  # Long enough that the rings wrap many times, still equal to the full pass.
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 61), 1, V)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  full = jax.jit(model.apply)({"params": params}, tokens)
  np.testing.assert_allclose(cached_logits(model, params, tokens, "retina"), full, atol=ATOL,
                             rtol=1e-4)
