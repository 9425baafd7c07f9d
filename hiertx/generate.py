r"""Samples from a checkpoint with cached incremental decoding (`hiertx.decode`).

  python -m hiertx.generate --workdir=/tmp/hiertx_run --prompt='def main(' \
      --max_new_tokens=200 --temperature=0.8 --top_k=40 --seed=1

Loads the newest checkpoint (or --step), builds the caches from one parallel
pass over the prompt, then decodes token by token; both phases are one jitted
program. --temperature=0 is greedy decoding.
"""

import sys

import jax
import numpy as np
from absl import flags

from hiertx import cli
from hiertx import decode
from hiertx import steps
from hiertx.errors import FlagError


def check_sampling(temperature, top_k, top_p) -> None:
  if temperature < 0:
    raise FlagError("--temperature", f"must be >= 0, got {temperature}")
  if top_k < 0:
    raise FlagError("--top_k", f"must be >= 0 (0: off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise FlagError("--top_p", f"must be in (0, 1], got {top_p}")


def from_checkpoint(workdir: str, prompt: str, max_new_tokens: int, temperature=0.0, top_k=0,
                    top_p=1.0, seed=0, step=None) -> tuple[str, int]:
  """(continuation text, checkpoint step) for `prompt`."""
  check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise FlagError("--max_new_tokens", f"must be >= 1, got {max_new_tokens}")
  if not prompt:
    raise FlagError("--prompt", "must not be empty: the model needs a token to continue")
  config, run, step, params = steps.load_params(workdir, step, "data=1",
                                                   jax.local_devices()[:1], needs_data=False)
  ids = np.asarray(run.vocab.encode(prompt), np.int32)[None]
  dec = decode.decoder(run.model, ids.shape[1] + max_new_tokens)
  params = jax.device_get(params)
  out = np.asarray(decode.generate_cached(params, ids, seed, dec=dec, new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k,
                                          top_p=top_p))[0]
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
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  cli.log_to_workdir(f.workdir, "generate")
  text, step = cli.run(from_checkpoint, f.workdir, f.prompt, f.max_new_tokens, f.temperature,
                       f.top_k, f.top_p, f.seed, f.step)
  print(f"# checkpoint step {step}", file=sys.stderr)
  print(f.prompt + text, flush=True)


def run() -> None:
  """The `hiertx-generate` console script."""
  cli.command(define_flags, main)


if __name__ == "__main__":
  run()
