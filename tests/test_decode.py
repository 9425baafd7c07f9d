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

DECODABLE = sorted(MODELS)


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
