r"""How each model's training-step memory and time grow with sequence length.

  python experiments/seq_scaling.py --seq_lens=512,1024,2048,4096,8192 --batch_size=1
  python experiments/seq_scaling.py --set=model.remat=block

Memory is XLA's compile-time analysis (nothing is allocated, so 8192 tokens
of vanilla attention compile fine on a laptop); activation memory is XLA's
temporary bytes less one copy of the parameters (the gradients). Step time is
measured by running the step where `seq_len <= --time_max_len`. Prints one
table with the growth factor per doubling and over the whole range.
"""

from absl import app, flags

from hiertx import benchmark, cli, results

DEFAULT_RUNS = ["vanilla.py:size=base", "bottom_up.py:size=base", "top_down.py:size=base",
                "retina.py:size=base", "hourglass.py:size=base"]


def define_flags() -> None:
  flags.DEFINE_list("runs", DEFAULT_RUNS, "Config files (under configs/) with args.")
  flags.DEFINE_list("seq_lens", ["512", "1024", "2048", "4096", "8192"], "Lengths.")
  flags.DEFINE_integer("batch_size", 1, "Global batch at every length.", lower_bound=1)
  flags.DEFINE_integer("time_max_len", 2048, "Run and time the step up to this length.",
                       lower_bound=1)
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")


def activation_bytes(facts: dict) -> float:
  return facts["memory/xla_temp_bytes"] - 4 * facts["params/total"]


def measure(specs, seq_lens, batch, time_max_len, sets) -> list[dict]:
  rows = []
  for spec in specs:
    for t in seq_lens:
      config = benchmark.config_for(spec, t, batch, sets)
      run, compiled, facts = benchmark.compile_step(config)
      step_s = (benchmark.time_steps(run, compiled, config, steps=3)
                if t <= time_max_len else None)
      rows.append({"run": spec, "seq_len": t, "peak": facts["memory/xla_peak_bytes"],
                   "activations": activation_bytes(facts),
                   "analytic": facts["memory/analytic_peak_bytes"], "step_s": step_s})
      print(f"{spec} T={t}: peak {rows[-1]['peak'] / 2**20:.1f} MiB"
            + (f", {step_s:.3f} s/step" if step_s else ""), flush=True)
  return rows


def growth(rows: list[dict], key: str, start: int) -> dict:
  """Per run: {seq_len: value / value at the previous length}, and `start`-to-last."""
  out = {}
  for r in rows:
    out.setdefault(r["run"], []).append((r["seq_len"], r[key]))
  result = {}
  for run, pts in out.items():
    per = {t: (v / pv if v and pv else None) for (pt, pv), (t, v) in zip(pts, pts[1:])}
    base = dict(pts).get(start)
    total = pts[-1][1] / base if pts[-1][1] and base else None
    result[run] = (per, total)
  return result


def table(rows: list[dict]) -> str:
  lens = [r["seq_len"] for r in rows]
  first, last = (1024 if 1024 in lens else min(lens)), max(lens)
  mem, act, tim = (growth(rows, k, first) for k in ("peak", "activations", "step_s"))
  lines = []
  for r in rows:
    prev = mem[r["run"]][0].get(r["seq_len"])
    prev_act = act[r["run"]][0].get(r["seq_len"])
    prev_t = tim[r["run"]][0].get(r["seq_len"])
    lines.append([r["run"], r["seq_len"], r["peak"] / 2**20, r["analytic"] / 2**20,
                  r["activations"] / 2**20, f"{prev_act:.2f}" if prev_act else "",
                  f"{prev:.2f}" if prev else "",
                  f"{r['step_s']:.3f}" if r["step_s"] else "not run",
                  f"{prev_t:.2f}" if prev_t else ""])
  body = results.markdown_table(
      ["run", "seq_len", "XLA peak MiB", "analytic MiB", "activation MiB",
       "activation x per doubling", "peak x per doubling", "step s", "time x per doubling"],
      lines)
  totals = results.markdown_table(
      ["run", f"activation x {first}->{last}", f"peak x {first}->{last}"],
      [[run, f"{act[run][1]:.1f}", f"{mem[run][1]:.1f}"] for run in mem])
  return body + "\n\n" + totals


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  rows = cli.run(measure, f.runs, cli.run(cli.int_list, f.seq_lens, "--seq_lens"),
                 f.batch_size, f.time_max_len, f.set)
  print(f"\nbatch {f.batch_size}, overrides {f.set or 'none'}\n")
  print(table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
