"""Incremental decoding for any model, and sampling (docs/design.md section 5).

Each model defines its decoding beside its forward pass, on the same
submodules (`init_cache`, `prefill`, `step` in `hiertx.models`). This module
turns those into a pure decoder over parameters and an explicit state pytree:

  dec = decoder(model, capacity)
  state, logits_BxV = dec.prefill(params, prompt_BxP)  # one parallel pass
  state, logits_BxV = dec.step(params, state, token_B, t)  # t = P, P+1, ...

Every buffer has a fixed capacity, so `step` compiles once; `generate_cached`
runs the prompt pass and the steps as one jitted program.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from hiertx import layers
from hiertx.errors import ConfigError
from hiertx.models import base


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A model's cached decoding holding up to `capacity` fine positions."""

  model: base.LanguageModel
  capacity: int

  def init(self, batch: int):
    """Empty caches."""
    return self.model.init_cache(batch, self.capacity)

  def prefill(self, params, prompt_BxP):
    """(state, logits_BxV): positions 0 .. P-1 in one parallel pass; the logits predict P."""
    b, p = prompt_BxP.shape
    if not 1 <= p <= self.capacity:
      raise ValueError(f"a prompt of {p} tokens does not fit a decoder of capacity "
                       f"{self.capacity}")
    out, _ = self.model.apply({"params": flax.linen.unbox(params)}, prompt_BxP, self.capacity,
                              method=type(self.model).prefill, mutable=[layers.DECODE])
    return out

  def step(self, params, state, token_B, t):
    """(state, logits_BxV): adds fine position t; the logits predict t + 1."""
    return self.model.apply({"params": flax.linen.unbox(params)}, state, token_B,
                            jnp.asarray(t, jnp.int32), method=type(self.model).step)


def decoder(model: base.LanguageModel, capacity: int) -> Decoder:
  """A cached decoder for `model` holding up to `capacity` fine positions."""
  if model.positions == "learned" and capacity > model.max_len:
    raise ConfigError("model.max_len", f"learned positions stop at {model.max_len}; cannot "
                      f"decode {capacity} positions (prompt plus new tokens)")
  # Inference needs no rematerialisation.
  return Decoder(model.clone(remat="none"), model.decode_capacity(capacity))


def feed(dec: Decoder, params, prompt_BxP):
  """The prompt through `step` one token at a time (the reference for `prefill`):
  (state, logits_PxBxV)."""
  def body(state, inp):
    token_B, t = inp
    return dec.step(params, state, token_B, t)
  p = prompt_BxP.shape[1]
  return jax.lax.scan(body, dec.init(prompt_BxP.shape[0]), (prompt_BxP.T, jnp.arange(p)))


def sample(logits_BxV, rng, temperature: float, top_k: int, top_p: float):
  """Greedy at temperature 0; else softmax sampling, optionally top-k / nucleus."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, -1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, -1)
    # Keep the smallest set whose mass reaches top_p (always the most likely token).
    keep = jnp.cumsum(probs, -1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dec", "new_tokens", "temperature", "top_k",
                                             "top_p"))
def generate_cached(params, prompt_BxP, seed, *, dec: Decoder, new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """The prompt in one parallel pass, then `new_tokens` cached steps -> [B, new_tokens]."""
  p = prompt_BxP.shape[1]
  state, logits_BxV = dec.prefill(params, prompt_BxP)
  rng = jax.random.PRNGKey(seed)

  def gen(carry, i):
    state, logits_BxV = carry
    token = sample(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    state, logits_BxV = dec.step(params, state, token, p + i)
    return (state, logits_BxV), token

  _, tokens_NxB = jax.lax.scan(gen, (state, logits_BxV), jnp.arange(new_tokens))
  return tokens_NxB.T


@functools.partial(jax.jit, static_argnames=("model", "new_tokens", "temperature", "top_k",
                                             "top_p"))
def generate_recompute(params, prompt_BxP, seed, *, model, new_tokens: int,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """The reference: the full forward pass over the whole buffer for every token."""
  b, p = prompt_BxP.shape
  buf = jnp.zeros((b, p + new_tokens), jnp.int32).at[:, :p].set(prompt_BxP)
  rng = jax.random.PRNGKey(seed)

  def gen(buf, i):
    logits_BxV = model.apply({"params": params}, buf)[:, p + i - 1]
    token = sample(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    return buf.at[:, p + i].set(token), token

  _, tokens_NxB = jax.lax.scan(gen, buf, jnp.arange(new_tokens))
  return tokens_NxB.T
