r"""Evaluates a checkpoint: `python -m hiertx.evaluate --workdir=... [--step] [--split]`.

Rebuilds the model from the workdir's config.json, restores the newest (or
the given) checkpoint onto the current devices, and scores the split with
the same batches the trainer uses. Prints loss, perplexity and bits per byte
and writes them to `<workdir>/eval_<split>_<step>.json`.
"""

import json
import os

import jax
from absl import app, flags

from hiertx import checkpoint
from hiertx import cli
from hiertx import data
from hiertx import distributed
from hiertx import steps
from hiertx.errors import CheckpointError, ConfigError


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
  out = {"data": 1, "fsdp": 1, "tensor": 1}
  for item in filter(None, text.split(",")):
    axis, _, size = item.partition("=")
    if axis not in out or not size.lstrip("-").isdigit():
      raise ConfigError("mesh", f"--mesh={text!r}: expected items like data=2,fsdp=4")
    out[axis] = int(size)
  return out


def load_checkpoint(workdir: str, step: int | None = None, mesh: str = "data=-1",
                    devices=None):
  """(config, run, step, state) of a workdir's checkpoint (default: the newest),
  restored onto `mesh` whatever mesh it was saved from."""
  config = checkpoint.load_config(workdir)
  config.mesh.update(parse_mesh(mesh))
  run = steps.build_run(config, devices)
  mngr = checkpoint.manager(workdir)
  saved = mngr.all_steps()
  if not saved:
    raise CheckpointError(f"{workdir!r} has no checkpoints")
  step = max(saved) if step is None else step
  if step not in saved:
    raise CheckpointError(f"{workdir!r} has no checkpoint at step {step}; it has {sorted(saved)}")
  state = checkpoint.restore(mngr, step, run.abstract_state)
  mngr.close()
  return config, run, step, state


def evaluate_checkpoint(workdir: str, step: int | None = None, split: str | None = None,
                        batches: int | None = None, mesh: str = "data=-1",
                        devices=None) -> dict:
  """Scores a checkpoint, restored onto `mesh` over `devices` (default: all,
  data parallel), whatever mesh it was saved from."""
  config, run, step, state = load_checkpoint(workdir, step, mesh, devices)
  if batches is not None:
    config.eval.batches = batches
  split = split or config.eval.split
  eval_data = data.eval_batches(config.data, split, config.eval.batch_size,
                                config.eval.batches,
                                data.Shard(jax.process_index(), jax.process_count()))
  result = {"step": step, "split": split, **run.evaluate(state.params, eval_data)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{split}_{step}.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  distributed.initialize_from_flags()
  f = flags.FLAGS
  r = cli.run(evaluate_checkpoint, f.workdir, f.step, f.split, f.batches, f.mesh)
  print(f"step {r['step']} ({r['split']}): loss {r['eval/loss']:.4f} | perplexity "
        f"{r['eval/perplexity']:.3f} | bits/byte {r['eval/bits_per_byte']:.4f} | "
        f"{r['eval/tokens']:.0f} tokens", flush=True)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A hiertx training workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_enum("split", None, ["train", "validation", "test"],
                    "Split to score (default: the config's eval.split).")
  flags.DEFINE_integer("batches", None, "Batches to score (default: eval.batches).")
  flags.DEFINE_string("mesh", "data=-1", "Mesh to restore onto, e.g. data=2,fsdp=4 "
                      "(-1: the remaining devices); independent of the training mesh.")
  flags.mark_flags_as_required(["workdir"])
  distributed.define_flags()


if __name__ == "__main__":
  define_flags()
  app.run(main)
