r"""The one table `experiments/gpu_check.sh` ends with, from what its parts
left in its output directory: each model's tokens/s, model-FLOPs MFU (against
the peak of the run's dtype: bfloat16 on a GPU), XLA peak memory and which
kernel its attention sites got; hourglass's step time over vanilla's; hiertx
vanilla against the compiled PyTorch reference; and every part that did not
finish, with why.

  python experiments/gpu_summary.py /tmp/gpu_check
"""

import collections
import json
import os
import re
import sys

from absl import app, flags

from hiertx import cli, results

# The bench parts of gpu_check.sh, in the order it runs them.
PARTS = ("vanilla", "hourglass", "top_down", "bottom_up", "retina")
_SITE = re.compile(r"-> (\w+)(?: \((.*)\))?(?: \[x(\d+)\])?$")
_TORCH = re.compile(r"peer (\S+) (\d+)x(\d+): ([\d,]+) tokens/s, ([\d.]+) ms/step")


def define_flags() -> None:
  flags.DEFINE_bool("strict", False, "Exit 1 if a part did not finish.")


def kernels(sites_text: str) -> str:
  """'cudnn 28, pallas 6' from a run's attention-site lines."""
  count = collections.Counter()
  for line in sites_text.splitlines():
    m = _SITE.search(line.strip())
    if m:
      count[m.group(1)] += int(m.group(3) or 1)
  return ", ".join(f"{k} {n}" for k, n in count.most_common())


def torch_rows(log_path: str) -> list[dict]:
  if not os.path.exists(log_path):
    return []
  with open(log_path) as f:
    return [{"kind": m.group(1), "shape": f"{m.group(3)}x{m.group(2)}",
             "tokens_per_s": float(m.group(4).replace(",", "")),
             "step_s": float(m.group(5)) / 1e3} for m in map(_TORCH.search, f) if m]


def last_error(log_path: str) -> str:
  if not os.path.exists(log_path):
    return "not run"
  with open(log_path) as f:
    lines = [x.strip() for x in f if x.strip()]
  errors = [x for x in lines if x.startswith(("error:", "Traceback")) or "Error" in x]
  return (errors or lines or ["empty log"])[-1][:200]


def summarize(out_dir: str) -> tuple[str, list[str]]:
  """(the table as Markdown, the parts that did not finish)."""
  rows, missing, by_part = [], [], {}
  for part in PARTS:
    path = os.path.join(out_dir, f"{part}.json")
    if not os.path.exists(path):
      if os.path.exists(os.path.join(out_dir, f"{part}.log")):
        missing.append(f"{part}: {last_error(os.path.join(out_dir, part + '.log'))}")
      continue
    with open(path) as f:
      for r in json.load(f):
        by_part[part] = r
        rows.append([part, r["shape"], r["dtype"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['step_s'] * 1e3:.1f}", f"{r['mfu']:.1%}", f"{r['peak_mib']:,.0f}",
                     kernels(r.get("sites", ""))])
  ratios = []
  if "vanilla" in by_part and "hourglass" in by_part:
    ratios.append(["hourglass / vanilla step time",
                   f"{by_part['hourglass']['step_s'] / by_part['vanilla']['step_s']:.2f}"])
  for t in torch_rows(os.path.join(out_dir, "torch_compiled.log")):
    if "vanilla" in by_part:
      ratios.append([f"hiertx vanilla / torch {t['kind']} tokens/s",
                     f"{by_part['vanilla']['tokens_per_s'] / t['tokens_per_s']:.2f}"])
  if os.path.exists(os.path.join(out_dir, "torch_compiled.log")) and not torch_rows(
      os.path.join(out_dir, "torch_compiled.log")):
    missing.append(f"torch_compiled: {last_error(os.path.join(out_dir, 'torch_compiled.log'))}")
  profile = os.path.join(out_dir, "profile_top.txt")
  if os.path.exists(os.path.join(out_dir, "profile.log")) and not (
      os.path.exists(profile) and os.path.getsize(profile)):
    missing.append(f"profile: {last_error(os.path.join(out_dir, 'profile.log'))}")
  text = results.markdown_table(
      ["part", "batch x length", "dtype", "tokens/s", "ms/step", "MFU", "XLA peak MiB",
       "attention kernels (sites)"], rows)
  if ratios:
    text += "\n\n" + results.markdown_table(["ratio", "value"], ratios)
  if missing:
    text += "\n\nnot finished:\n" + "\n".join(f"- {m}" for m in missing)
  return text, missing


def main(argv):
  if len(argv) != 2:
    sys.exit("error: usage: gpu_summary.py OUT_DIR")
  cli.quiet_library_logs()
  if not os.path.isdir(argv[1]):
    sys.exit(f"error: no directory {argv[1]!r}")
  text, missing = summarize(argv[1])
  print(text)
  if missing and flags.FLAGS.strict:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
