r"""Generation speed: cached incremental decoding against re-running the full
forward pass for every new token, for every model side by side, at several
context lengths; with the bytes each model's caches hold.

  python experiments/decode_bench.py --contexts=256,1024,4096
  python experiments/decode_bench.py --runs=vanilla.py:size=base,retina.py:size=base

Parameters are random (speed does not depend on them). The cached rate is
`--new_tokens` steps after the context has been through the caches; the
recompute rate is one full forward pass over the context per token. The
prompt columns time building the caches for the context: one parallel pass
(`Decoder.prefill`) against feeding it one token at a time.
"""

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from hiertx import benchmark, cli, decode, models, results
from hiertx import vocab as vocab_lib

DEFAULT_RUNS = ["vanilla.py", "bottom_up.py", "top_down.py", "retina.py", "hourglass.py"]


def define_flags() -> None:
  flags.DEFINE_list("runs", DEFAULT_RUNS, "Config files (under configs/) with args.")
  flags.DEFINE_list("contexts", ["256", "1024", "4096"], "Context lengths.")
  flags.DEFINE_integer("new_tokens", 32, "Cached decoding steps timed per context.", lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is kept).", lower_bound=1)
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")


def _best_time(fn, repeats) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def measure_one(spec, context, new_tokens, repeats, sets) -> dict:
  config = benchmark.config_for(spec, context, 1, [f"model.max_len={context + new_tokens}",
                                                   *sets])
  vocab = vocab_lib.vocabulary(config.data.vocab)
  model = models.build(config.model, vocab.vocab_size, context)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, context), 1, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  dec = decode.decoder(model, context + new_tokens)

  @jax.jit
  def decode_n(params, state, logits):
    def gen(carry, i):
      state, logits = carry
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      return dec.step(params, state, token, context + i), token
    return jax.lax.scan(gen, (state, logits), jnp.arange(new_tokens))[1]

  prefill = jax.jit(dec.prefill)
  feed = jax.jit(functools.partial(decode.feed, dec))
  prefill_s = _best_time(lambda: prefill(params, tokens), repeats)
  # The token-by-token prompt pass is slow at long contexts: timed once.
  feed_s = _best_time(lambda: feed(params, tokens), 1)
  state, logits = prefill(params, tokens)
  cached_s = _best_time(functools.partial(decode_n, params, state, logits), repeats) / new_tokens
  full = jax.jit(model.apply)
  recompute_s = _best_time(lambda: full({"params": params}, tokens), repeats)
  cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  return {"run": spec, "model": config.model.name, "context": context,
          "cached_tok_s": 1 / cached_s, "recompute_tok_s": 1 / recompute_s,
          "speedup": recompute_s / cached_s, "cache_bytes": cache_bytes,
          "prefill_s": prefill_s, "feed_s": feed_s}


def measure(specs, contexts, new_tokens, repeats, sets) -> list[dict]:
  rows = []
  for spec in specs:
    for c in contexts:
      rows.append(measure_one(spec, c, new_tokens, repeats, sets))
      r = rows[-1]
      print(f"{spec} context {c}: cached {r['cached_tok_s']:,.0f} tok/s, recompute "
            f"{r['recompute_tok_s']:,.1f} tok/s ({r['speedup']:.0f}x); prompt pass "
            f"{r['prefill_s']:.3f} s parallel, {r['feed_s']:.3f} s token by token", flush=True)
  return rows


def table(rows) -> str:
  first = {}
  for r in rows:
    first.setdefault(r["run"], r["cache_bytes"])
  return results.markdown_table(
      ["run", "context", "cached tok/s", "recompute tok/s", "speedup", "cache MiB",
       "cache / first context", "prompt s (parallel)", "prompt s (token by token)",
       "prompt speedup"],
      [[r["run"], r["context"], f"{r['cached_tok_s']:,.0f}", f"{r['recompute_tok_s']:,.1f}",
        f"{r['speedup']:.1f}x", r["cache_bytes"] / 2**20,
        f"{r['cache_bytes'] / first[r['run']]:.2f}", f"{r['prefill_s']:.3f}",
        f"{r['feed_s']:.3f}", f"{r['feed_s'] / r['prefill_s']:.1f}x"] for r in rows])


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  rows = cli.run(measure, f.runs, cli.run(cli.int_list, f.contexts, "--contexts"),
                 f.new_tokens, f.repeats, f.set)
  print(f"\nbatch 1, {f.new_tokens} cached steps per context, overrides {f.set or 'none'}\n")
  print(table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
