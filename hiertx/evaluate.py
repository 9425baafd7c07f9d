r"""Evaluates a checkpoint: `python -m hiertx.evaluate --workdir=... [--step] [--split]`.

  # the rows the trainer evaluates (reproduces its logged eval loss)
  python -m hiertx.evaluate --workdir=W [--step=N] [--split=test]
  # every byte of every document of the split, each with up to 4096 tokens of
  # context, in windows advancing 1024 tokens at a time
  python -m hiertx.evaluate --workdir=W --split=test --context=4096 --stride=1024

Rebuilds the model from the workdir's config.json and restores the
checkpoint's parameters (nothing else) onto the current devices. Prints loss,
perplexity, bits per byte and what was scored, with `gzip -9` and `xz -9`
bits per byte of the same text beside them, and writes the result to
`<workdir>/eval_<split>_<step>[_ctx<C>_stride<S>].json`.

Whole-document evaluation scores each token of a document exactly once: the
k-th window scores tokens [kS, kS + S) of the document and reads the C - S
tokens before them too, so every token has at least C - S tokens of context
(fewer only near a document's start) and at most C. With C = S =
data.seq_len the windows are the pieces training cuts documents into, and
the number is the row-based one on unpacked rows.
"""

import json
import sys
import time

import jax
import numpy as np
from absl import flags

from hiertx import baselines, checkpoint
from hiertx import config as config_lib
from hiertx import cli
from hiertx import data
from hiertx import distributed
from hiertx import metrics
from hiertx import sharding
from hiertx import steps
from hiertx import storage
from hiertx.errors import FlagError


def _write(workdir: str, name: str, result: dict) -> None:
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, name), json.dumps(result, indent=2))


def evaluate_checkpoint(workdir: str, step: int | None = None, split: str | None = None,
                        batches: int | None = None, mesh: str = "data=-1",
                        devices=None) -> dict:
  """Scores a checkpoint on the trainer's evaluation rows, restored onto
  `mesh` over `devices` (default: all, data parallel)."""
  config, run, step, params = steps.load_params(workdir, step, mesh, devices)
  if batches is not None:
    config.eval.batches = batches
    config_lib.validate(config)  # batches < 1 would score nothing and report 0 bits
  split = split or config.eval.split
  shard = run.data_shard
  eval_data = data.eval_batches(config.data, split, config.eval.batch_size,
                                config.eval.batches, shard, run.align)
  result = {"step": step, "split": split, **run.evaluate(params, eval_data),
            **baselines.compressor_bits_per_byte(data.scored_text(eval_data, run.vocab))}
  _write(workdir, f"eval_{split}_{step}.json", result)
  return result


def windows(doc_lengths, context: int, stride: int) -> list[tuple[int, int, int, int]]:
  """(document, first token read, first scored, end) of every window: each
  token of each document scored once; a window reads the `context - stride`
  tokens before the ones it scores (fewer at a document's start)."""
  out = []
  for d, length in enumerate(doc_lengths):
    for lo in range(0, length, stride):
      out.append((d, max(0, lo - (context - stride)), lo, min(lo + stride, length)))
  return out


def evaluate_documents(workdir: str, split: str, context: int, stride: int,
                       step: int | None = None, mesh: str = "data=-1", devices=None,
                       batch_size: int | None = None) -> dict:
  """Bits per byte over every token of every document of `split`, each scored
  once with up to `context` tokens of context, windows advancing `stride`,
  `batch_size` windows at a time (default: the run's eval.batch_size)."""
  if stride < 1 or context < stride:
    raise FlagError("--stride", f"must be between 1 and --context={context}, got {stride}")
  config, run, step, params = steps.load_params(workdir, step, mesh, devices, seq_len=context)
  global_batch = batch_size or config.eval.batch_size
  par = sharding.batch_parallelism(run.mesh)
  if global_batch < 1 or global_batch % par:
    raise FlagError("--batch_size", f"must be a positive multiple of the mesh's {par}-way batch "
                    f"parallelism (data x fsdp), got {global_batch}")
  docs = list(data.documents(config.data, split))
  plan = windows([len(d) for d in docs], context, stride)
  shard = run.data_shard
  local = global_batch // shard.count
  sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
  scored = bytearray()
  t0, n_batches = time.time(), -(-len(plan) // global_batch)
  for b in range(n_batches):
    chunk = plan[b * global_batch:(b + 1) * global_batch]
    targets = np.zeros((global_batch, context), np.int32)
    segments = np.zeros_like(targets)
    scored_mask = np.zeros_like(targets)
    for i, (d, start, lo, hi) in enumerate(chunk):
      targets[i, :hi - start] = docs[d][start:hi]
      segments[i, :hi - start] = 1
      scored_mask[i, lo - start:hi - start] = 1
      scored += data.scored_text([{"targets": targets[i:i + 1], "weights": scored_mask[i:i + 1]}],
                                 run.vocab)
    batch = data.batch_of(targets, segments)
    batch["weights"] = scored_mask
    rows = slice(shard.index * local, (shard.index + 1) * local)
    out = jax.device_get(run.eval_step(params, run.put_batch({k: v[rows] for k, v in
                                                              batch.items()})))
    for k in out:
      sums[k] = sums.get(k, 0.0) + float(out[k])
    if (b + 1) % 50 == 0 and jax.process_index() == 0:
      done = time.time() - t0
      print(f"  {b + 1}/{n_batches} batches, ETA {done / (b + 1) * (n_batches - b - 1):.0f}s",
            flush=True)
  total = sum(len(d) for d in docs)
  if sums["tokens"] != total:
    raise AssertionError(f"scored {sums['tokens']:.0f} of {total} tokens")
  result = {"step": step, "split": split, "context": context, "stride": stride,
            "documents": len(docs), "windows": len(plan), **metrics.summarize_eval(sums),
            "eval/bytes": sums["bytes"], **baselines.compressor_bits_per_byte(bytes(scored))}
  _write(workdir, f"eval_{split}_{step}_ctx{context}_stride{stride}.json", result)
  return result


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A hiertx training workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", lower_bound=0)
  flags.DEFINE_enum("split", None, ["train", "validation", "test"],
                    "Split to score (default: the config's eval.split).")
  flags.DEFINE_integer("batches", None, "Batches to score (default: eval.batches).", lower_bound=1)
  flags.DEFINE_string("mesh", "data=-1", "Mesh to restore onto, e.g. data=2,fsdp=4 "
                      "(-1: the remaining devices); independent of the training mesh.")
  flags.DEFINE_integer("context", None, "Whole-document evaluation: tokens each window "
                       "reads (default: --stride, or data.seq_len).", lower_bound=1)
  flags.DEFINE_integer("stride", None, "Whole-document evaluation: tokens each window "
                       "scores (default: --context).", lower_bound=1)
  flags.DEFINE_integer("batch_size", None, "Whole-document evaluation: windows per batch "
                       "(default: eval.batch_size; no gradients, so larger fits).", lower_bound=1)
  flags.mark_flags_as_required(["workdir"])
  distributed.define_flags()


def _baselines(r: dict) -> str:
  return (f"gzip -9 {r['gzip_bits_per_byte']:.4f}, xz -9 {r['xz_bits_per_byte']:.4f} "
          "bits/byte on the same text")


def main(argv):
  cli.start(argv)
  distributed.initialize_from_flags()
  f = flags.FLAGS
  cli.log_to_workdir(f.workdir, "evaluate")
  if f.context is None and f.stride is None:
    r = cli.run(evaluate_checkpoint, f.workdir, f.step, f.split, f.batches, f.mesh)
    print(f"step {r['step']} ({r['split']}): loss {r['eval/loss']:.4f} | perplexity "
          f"{r['eval/perplexity']:.3f} | bits/byte {r['eval/bits_per_byte']:.4f} | "
          f"{r['eval/tokens']:.0f} tokens; {_baselines(r)}{metrics.groups_text(r)}", flush=True)
    return
  config = cli.run(checkpoint.load_config, f.workdir)
  context = f.context or f.stride or config.data.seq_len
  r = cli.run(evaluate_documents, f.workdir, f.split or config.eval.split, context,
              f.stride or context, f.step, f.mesh, batch_size=f.batch_size)
  print(f"step {r['step']} ({r['split']}, whole documents, context {r['context']}, stride "
        f"{r['stride']}): bits/byte {r['eval/bits_per_byte']:.4f} | {r['eval/bytes']:,.0f} "
        f"bytes in {r['documents']:,} documents ({r['windows']:,} windows) | loss "
        f"{r['eval/loss']:.4f}; {_baselines(r)}{metrics.groups_text(r)}", flush=True)
  sys.stdout.flush()


def run() -> None:
  """The `hiertx-evaluate` console script."""
  cli.command(define_flags, main)


if __name__ == "__main__":
  run()
