r"""Samples from a checkpoint with cached incremental decoding (`hiertx.decode`).

  python -m hiertx.generate --workdir=/tmp/hiertx_run --prompt='def main(' \
      --max_new_tokens=200 --temperature=0.8 --top_k=40 --seed=1

Loads the newest checkpoint (or --step), builds the caches from one parallel
pass over the prompt, then decodes token by token; both phases are one jitted
program. --temperature=0 is
greedy decoding.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hiertx import decode
from hiertx.errors import FlagError, HiertxError


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


def check_sampling(temperature, top_k, top_p) -> None:
  if temperature < 0:
    raise FlagError("--temperature", f"must be >= 0, got {temperature}")
  if top_k < 0:
    raise FlagError("--top_k", f"must be >= 0 (0: off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise FlagError("--top_p", f"must be in (0, 1], got {top_p}")


@functools.partial(jax.jit, static_argnames=("dec", "new_tokens", "temperature", "top_k",
                                             "top_p"))
def generate_cached(params, prompt_BxP, seed, *, dec: decode.Decoder, new_tokens: int,
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


def from_checkpoint(workdir: str, prompt: str, max_new_tokens: int, temperature=0.0, top_k=0,
                    top_p=1.0, seed=0, step=None) -> tuple[str, int]:
  """(continuation text, checkpoint step) for `prompt`."""
  from hiertx import evaluate  # noqa: PLC0415  (imports the trainer)

  check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise FlagError("--max_new_tokens", f"must be >= 1, got {max_new_tokens}")
  if not prompt:
    raise FlagError("--prompt", "must not be empty: the model needs a token to continue")
  config, run, step, state = evaluate.load_checkpoint(workdir, step, "data=1",
                                                      jax.local_devices()[:1])
  ids = np.asarray(run.vocab.encode(prompt), np.int32)[None]
  dec = decode.decoder(run.model, ids.shape[1] + max_new_tokens, config.model.name)
  params = jax.device_get(state.params)
  out = np.asarray(generate_cached(params, ids, seed, dec=dec, new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p))[0]
  eos = getattr(run.vocab, "eos_id", None)
  if eos is not None and eos in out:
    out = out[:list(out).index(eos)]
  return run.vocab.decode(out.tolist()), step


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints.", required=True)
  flags.DEFINE_string("prompt", None, "Text to continue.", required=True)
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from hiertx import train  # noqa: PLC0415

  train.quiet_library_logs()
  f = flags.FLAGS
  try:
    text, step = from_checkpoint(f.workdir, f.prompt, f.max_new_tokens, f.temperature, f.top_k,
                                 f.top_p, f.seed, f.step)
  except HiertxError as e:
    sys.exit(f"error: {e}")
  print(f"# checkpoint step {step}", file=sys.stderr)
  print(f.prompt + text, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
