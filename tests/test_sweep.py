"""Sweeps: expansion and naming, skipping finished runs, a local sweep with a
failing run end to end, and the SLURM/TPU renderings."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from hiertx import checkpoint
from hiertx import evaluate
from hiertx import grid
from hiertx.errors import ConfigError, FlagError, HiertxError

import report as sweep_report  # launch/report.py


def test_product_zip_and_chain_expand():
  runs = grid.product({"model.num_layers": [2, 4], "train.seed": [0, 1, 2]},
                       grid.zipped({"train.learning_rate": [1e-3, 3e-4],
                                     "train.warmup_steps": [10, 20]}))
  assert len(runs) == 2 * 3 * 2
  assert runs[0] == {"model.num_layers": 2, "train.seed": 0, "train.learning_rate": 1e-3,
                     "train.warmup_steps": 10}
  assert {(r["train.learning_rate"], r["train.warmup_steps"]) for r in runs} == {
      (1e-3, 10), (3e-4, 20)}
  assert len(grid.chain({"a.b": [1, 2]}, [{"a.c": 3}])) == 3
  with pytest.raises(ConfigError, match="equal lengths"):
    grid.zipped({"a.b": [1, 2], "a.c": [1]})
  with pytest.raises(ConfigError, match="non-empty list"):
    grid.product({"a.b": 3})


def test_runs_are_named_from_what_varies():
  runs = grid.expand("configs/compare.py:size=tiny", grid.product(
      {"arg.model": ["vanilla", "top_down"], "model.layers_per_scale": [(1, 2)]},
      {"train.seed": [0, 1]}))
  assert [r.name for r in runs] == ["model-vanilla.seed-0", "model-vanilla.seed-1",
                                    "model-top_down.seed-0", "model-top_down.seed-1"]
  assert runs[2].config == "configs/compare.py:size=tiny,model=top_down"
  assert runs[2].flags == ("--config.model.layers_per_scale=(1,2)", "--config.train.seed=0")
  assert grid.run_name({"model.pool_factors": (4, 4), "data.seq_len": 512}) == (
      "pool_factors-4_4.seq_len-512")
  assert grid.run_name({"model.dropout": 0.1, "train.dropout": 0.2}) == (
      "model.dropout-0.1.train.dropout-0.2")
  with pytest.raises(ConfigError, match="dotted config paths"):
    grid.expand("c.py", [{"seed": 1}])


def test_the_shipped_sweeps_load():
  runs = grid.load(os.path.join(ROOT, "configs", "compare.py"), "paper_claim")
  assert len(runs) == 10 and {r["arg.model"] for r in runs} == {
      "vanilla", "bottom_up", "top_down", "retina", "hourglass"}
  for name, width, steps in (("claim", 128, 3000), ("claim_gpu", 512, 10000)):
    runs = grid.load(os.path.join(ROOT, "configs", "compare.py"), name)
    assert len(runs) == 8 and all(r["model.d_model"] == width for r in runs)
    assert all(r["train.steps"] >= steps for r in runs)
    sizes = {(r["arg.model"], r["arg.size"]) for r in runs}
    assert sizes == {("vanilla", "paper14"), ("bottom_up", "paper30"), ("top_down", "paper30"),
                     ("hourglass", "paper30")}
  # claim_lr: the claim's shape, every model at three rates, a third of its steps.
  claim = grid.load(os.path.join(ROOT, "configs", "compare.py"), "claim")[0]
  rates = grid.load(os.path.join(ROOT, "configs", "compare.py"), "claim_lr")
  shape = ("model.d_model", "model.mlp_dim", "data.seq_len", "data.batch_size")
  assert all({k: r[k] for k in shape} == {k: claim[k] for k in shape} for r in rates)
  assert sorted((r["arg.model"], r["train.learning_rate"]) for r in rates) == sorted(
      [(m, lr) for m in ("vanilla", "bottom_up", "top_down", "hourglass")
       for lr in (1e-3, 2e-3, 4e-3)] + [("top_down", 8e-3), ("hourglass", 8e-3)])
  # The claim trains each model at one of the rates claim_lr tried for it.
  tried = {(r["arg.model"], r["train.learning_rate"]) for r in rates}
  claim_runs = grid.load(os.path.join(ROOT, "configs", "compare.py"), "claim")
  assert all((r["arg.model"], r["train.learning_rate"]) in tried for r in claim_runs)
  assert {r["train.steps"] for r in rates} == {1000}
  with pytest.raises(FlagError,
                     match=r"^--sweep: .* has no sweep_nope\(\); its sweeps: .*paper_claim"):
    grid.load(os.path.join(ROOT, "configs", "compare.py"), "nope")


SWEEP_CONFIG = '''
import os
import signal
from hiertx import config as config_lib
from hiertx import grid

def get_config(arg=None):
  return config_lib.load(os.path.join({root!r}, "configs", "vanilla.py") + ":size=tiny")

def sweep_three():
  # num_heads=3 does not divide d_model=32: that run must fail cleanly.
  return grid.product({{"model.num_heads": [2, 4, 3]}},
                       [{{"train.steps": 4, "eval.every": 4, "train.checkpoint_every": 4,
                          "eval.batches": 1}}])
'''


def _sweep(*args):
  return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_local_sweep_with_a_failure_then_report_and_rerun(tmp_path):
  config = tmp_path / "sweep_config.py"
  config.write_text(SWEEP_CONFIG.format(root=ROOT))
  sweep_dir = tmp_path / "sweep"
  args = [f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}"]
  first = _sweep(*args, "--parallel=2")
  assert first.returncode != 0 and "failed: num_heads-3" in first.stderr
  md, rows = sweep_report.write(str(sweep_dir))
  assert [r["name"] for r in rows] == ["num_heads-2", "num_heads-4", "num_heads-3"]
  assert [r["state"] for r in rows] == ["finished", "finished", "failed"]
  assert "model.num_heads" in rows[2]["error"]
  assert md.count("\n| num_heads-") == 3 and "**FAILED**" in md
  assert "| memory / vanilla |" in md and "| Pareto |" in md  # every run here is vanilla
  assert "| gzip -9 bits/byte | xz -9 bits/byte |" in md
  assert 0 < rows[0]["gzip_bpb"] < 8 and 0 < rows[0]["xz_bpb"] < 8
  assert all(r["model"] == "vanilla" for r in rows[:2])
  assert rows[0]["step"] == 4 and rows[0]["final_bpb"] > 0 and rows[0]["xla_peak_bytes"] > 0
  # Training FLOPs per byte: the step's model FLOPs over the bytes its tokens stand for.
  info = json.loads((sweep_dir / "num_heads-2" / "run_info.json").read_text())
  per_token = info["facts"]["flops/step_model"] / info["tokens_per_step"]
  assert per_token <= rows[0]["flops_per_byte"] < 1.1 * per_token  # EOS: a token, no byte
  assert "| train MFLOPs/byte | FLOPs / vanilla |" in md
  assert sweep_report.plot_label(rows[0]) == "num_heads=2"  # what varies, not the name
  for png in ("loss_curves.png", "bpb_vs_memory.png"):
    assert os.path.getsize(sweep_dir / png) > 10_000

  again = _sweep(*args)
  assert "skip num_heads-2: finished" in again.stdout
  assert "skip num_heads-4: finished" in again.stdout
  assert "num_heads-3" in again.stderr  # retried, and fails again
  lines = (sweep_dir / "num_heads-2" / "metrics.jsonl").read_text().splitlines()
  assert sum('"train/loss"' in line for line in lines) == 1  # not retrained

  # The final checkpoint scored again by hiertx.evaluate on more rows: the
  # report's final numbers are that evaluation's, and say so.
  trained = rows[0]
  result = evaluate.evaluate_checkpoint(str(sweep_dir / "num_heads-2"), batches=5)
  assert result["eval/tokens"] > trained["final_tokens"]
  md, rows = sweep_report.write(str(sweep_dir))
  assert trained["final_source"] == "training"
  assert rows[0]["final_source"] == "eval_validation_4.json"
  assert rows[0]["final_tokens"] == result["eval/tokens"]
  assert rows[0]["final_bpb"] == result["eval/bits_per_byte"] != trained["final_bpb"]
  assert rows[1]["final_source"] == "training"  # not evaluated again
  assert "| eval_validation_4.json |" in md


def test_pinned_local_runs_each_get_their_own_cpus(tmp_path, capsys):
  import sweep as launcher  # launch/sweep.py
  assert launcher.cpu_slots(2, {3, 0, 2, 1}) == [{0, 1}, {2, 3}]
  assert launcher.cpu_slots(2, {0, 2, 5}) == [{0, 2}, {5}]
  with pytest.raises(HiertxError, match="3 runs at a time need at least 3 CPUs"):
    launcher.cpu_slots(3, {0, 1})
  # Two runs, one at a time, on one CPU: each child starts pinned to it, and
  # the second gets the set back once the first has finished.
  cpu = max(os.sched_getaffinity(0))
  show = "import os; print('cpus', sorted(os.sched_getaffinity(0)))"
  runs = [{"name": n, "workdir": str(tmp_path / n), "state": state,
           "command": [sys.executable, "-c", show]}
          for n, state in (("z", "finished"), ("a", "new"), ("b", "new"))]
  assert launcher.run_local(runs, 1, [{cpu}]) == {"a": 0, "b": 0}
  out = capsys.readouterr().out
  assert "skip z: finished" in out and "start a (2/3;" in out and "start b (3/3;" in out
  assert f"CPUs {cpu})" in out
  for n in ("a", "b"):
    assert (tmp_path / n / "train.log").read_text().strip() == f"cpus [{cpu}]"
  args = ["--config=configs/compare.py", "--sweep=claim", f"--sweep_dir={tmp_path / 's'}",
          "--pin_cpus"]
  too_many = _sweep(*args, "--parallel=999")
  assert too_many.returncode != 0 and "--pin_cpus: 999 runs at a time need at least 999" \
      in too_many.stderr
  elsewhere = _sweep(*args, "--target=slurm", "--dry_run")
  assert elsewhere.returncode != 0 and "--pin_cpus: only for --target=local" in elsewhere.stderr


def test_report_sets_each_model_against_the_vanilla_nearest_in_memory_and_in_flops():
  def row(model, layers, seed, bpb, memory, flops, state="finished"):
    return {"overrides": {"arg.model": model, "model.num_layers": layers, "train.seed": seed},
            "model": model, "seed": seed, "state": state, "final_bpb": bpb,
            "xla_peak_bytes": memory, "flops_per_byte": flops}
  rows = [row("vanilla", 6, 0, 2.30, 100, 10), row("vanilla", 6, 1, 2.20, 100, 10),
          row("vanilla", 14, 0, 2.10, 230, 22),
          # As much memory as 14 layers, the FLOPs of 6: ahead of the one, behind the other.
          row("hourglass", 30, 0, 2.15, 220, 11), row("hourglass", 30, 1, 2.17, 240, 11),
          row("hourglass", 99, 0, 1.0, 1, 1, state="failed")]
  table = sweep_report.baseline_table(rows).splitlines()
  assert len(table) == 3  # header, rule, one setting (the failed one is left out)
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  assert cells[:3] == ["model=hourglass model.num_layers=30", "2", "2.16"]
  assert cells[3] == "model=vanilla model.num_layers=14" and float(cells[4]) == 1.0
  assert float(cells[5]) == 2.1 and abs(float(cells[6]) - 0.06) < 1e-9
  assert cells[7] == "model=vanilla model.num_layers=6" and float(cells[8]) == 1.1
  assert float(cells[9]) == 2.25 and abs(float(cells[10]) + 0.09) < 1e-9
  assert sweep_report.baseline_table(rows[:3]) is None  # nothing to set against vanilla


def test_report_names_the_best_learning_rate_of_each_setting():
  def row(model, lr, seed, bpb, state="finished"):
    return {"overrides": {"arg.model": model, "train.learning_rate": lr, "train.seed": seed},
            "state": state, "final_bpb": bpb}
  rows = [row("vanilla", 1e-3, 0, 2.5), row("vanilla", 2e-3, 0, 2.2), row("vanilla", 2e-3, 1, 2.6),
          row("vanilla", 4e-3, 0, 2.3), row("hourglass", 1e-3, 0, 2.9),
          row("hourglass", 2e-3, 0, 2.7), row("hourglass", 4e-3, 0, float("nan"), "running")]
  table = sweep_report.rate_table(rows)
  # vanilla: 2e-3 averages 2.4 over its seeds, so 4e-3 (2.3) is best.
  assert ("| model=vanilla | 0.004 (highest tried) | 2.3 | 0.001: 2.5000, 0.002: 2.4000, "
          "0.004: 2.3000 | 3 of 3 |") in table
  assert "| model=hourglass | 0.002 | 2.7 | 0.001: 2.9000, 0.002: 2.7000 | 2 of 3 |" in table
  # top_down tried only two rates, and its best is the lower one; a run that
  # lists its overrides in another order is still the same setting.
  rows += [{"overrides": {"arg.model": "top_down", "arg.size": "s", "train.learning_rate": 1e-3},
            "state": "finished", "final_bpb": 2.1},
           {"overrides": {"train.learning_rate": 4e-3, "arg.size": "s", "arg.model": "top_down"},
            "state": "finished", "final_bpb": 2.4}]
  assert ("| model=top_down size=s | 0.001 (lowest tried) | 2.1 | 0.001: 2.1000, 0.004: 2.4000 "
          "| 2 of 2 |") in sweep_report.rate_table(rows)
  assert sweep_report.rate_table([row("vanilla", 1e-3, 0, 2.5), row("vanilla", 1e-3, 1, 2.4)]) \
      is None
  # Each model at its own chosen rate (the claim): no rate was chosen here.
  assert sweep_report.rate_table([row("vanilla", 2e-3, 0, 2.5), row("hourglass", 4e-3, 0, 2.4)]) \
      is None


def test_rerun_resumes_an_interrupted_run(tmp_path):
  config = tmp_path / "sweep_config.py"
  config.write_text(SWEEP_CONFIG.format(root=ROOT))
  sweep_dir = tmp_path / "sweep"
  out = _sweep(f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}", "--dry_run")
  assert out.returncode == 0 and not sweep_dir.exists()  # a dry run writes nothing
  import sweep as launcher  # launch/sweep.py
  launcher.plan(str(config), "three", str(sweep_dir), [])
  plan = json.loads((sweep_dir / "sweep.json").read_text())
  for run, state in zip(plan["runs"], ("interrupted", "finished")):
    os.makedirs(run["workdir"])
    checkpoint.write_status(run["workdir"], state, step=2)
  out = _sweep(f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}", "--dry_run")
  lines = out.stdout.splitlines()
  assert any(line.startswith("# finished: ") and "num_heads-4" in line for line in lines)
  assert any("num_heads-2" in line and not line.startswith("#") for line in lines)
  # The one run reader takes runs with no metrics or run_info (or nothing at all).
  md, rows = sweep_report.write(str(sweep_dir))
  assert [r["state"] for r in rows] == ["interrupted", "finished", "not started"]
  assert all(r["step"] == 0 and r["params"] is None and r["eval_curve"] == [] for r in rows)
  assert "**INTERRUPTED** (step 0)" in md and "**NOT STARTED** (step 0)" in md
  with pytest.raises(HiertxError, match="has no sweep.json: run launch/sweep.py"):
    sweep_report.write(str(tmp_path / "elsewhere"))
  # --only starts a subset (here the unfinished runs of 2 and 3 heads).
  out = _sweep(f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}", "--dry_run",
               "--only=num_heads-[23]")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "sweep three: 2 runs (2 of 3 by --only)" in out.stdout
  commands = [line for line in out.stdout.splitlines() if "hiertx.train" in line]
  assert len(commands) == 2 and not any("num_heads=4" in c for c in commands), commands
  runs = launcher.plan(str(config), "three", str(sweep_dir), [], write=False)
  with pytest.raises(HiertxError, match=r"--only='seed-9' matches none of the sweep's runs: "
                     "num_heads-2, num_heads-4, num_heads-3"):
    launcher.select(runs, "seed-9")
  with pytest.raises(HiertxError, match=r"--only='\[': not a regular expression"):
    launcher.select(runs, "[")


def test_slurm_array_and_tpu_renderings(tmp_path):
  shared = "/shared/hiertx/sweeps/claim"  # a dry run writes nothing, so it need not exist
  base = ["--config=configs/compare.py:size=tiny", "--sweep=paper_claim",
          f"--sweep_dir={shared}", "--dry_run"]
  out = _sweep(*base, "--target=slurm", "--partition=gpu", "--gpus_per_node=1",
               "--max_running=4", "--time=2-00", "--signal_before=600").stdout
  assert "#SBATCH --array=0-9%4" in out and "#SBATCH --partition=gpu" in out
  for line in ("#SBATCH --time=2-00", "#SBATCH --signal=USR1@600", "#SBATCH --requeue",
               "#SBATCH --open-mode=append", f"#SBATCH --output={shared}/slurm-%A_%a.out",
               'if [ "$status" -eq 75 ]; then', '  scontrol requeue "$SLURM_JOB_ID"'):
    assert line in out.splitlines(), line
  tmp_path = shared
  runs = [line.strip() for line in out.splitlines() if line.startswith("  'python3 ")]
  assert len(runs) == 10
  assert runs[0] == ("'python3 -m hiertx.train --config=configs/compare.py:size=tiny,"
                     f"model=vanilla --workdir={tmp_path}/model-vanilla.seed-0 "
                     "--config.train.seed=0 --config.train.steps=300 --config.eval.every=100 "
                     "--config.train.checkpoint_every=100'")
  assert 'srun bash -c "${RUNS[$SLURM_ARRAY_TASK_ID]}"' in out
  out = _sweep(*base, "--target=tpu", "--tpu=v4-8", "--zone=us-central2-b").stdout
  cmds = [line for line in out.splitlines() if line.startswith("gcloud ")]
  assert len(cmds) == 10 and all("--worker=all" in c for c in cmds)
  assert "model=hourglass --workdir=" in cmds[-1] and "seed-1" in cmds[-1]
  assert _sweep(*base, "--target=tpu").returncode != 0  # no --tpu/--zone: a clear error
  # Cluster targets need a sweep directory every node shares.
  base[2] = "--sweep_dir=/tmp/hiertx_sweeps/claim"
  r = _sweep(*base, "--target=slurm")
  assert r.returncode != 0 and r.stderr.strip().splitlines() == [
      "error: --sweep_dir: '/tmp/hiertx_sweeps/claim' is under /tmp, which each node keeps "
      "for itself: the runs of --target=slurm would write where launch/report.py never "
      "looks. Use a shared filesystem path or gs://bucket/..."]
  import common  # launch/common.py
  for path in ("/var/tmp/s", "/dev/shm/s", "/run/user/0/s", "/tmp"):
    with pytest.raises(HiertxError, match=r"--sweep_dir: .* which each node keeps for itself"):
      common.check_shared_dir(path, "--sweep_dir", "tpu")
  with pytest.raises(HiertxError, match="--target=tpu needs a directory every node and the "
                     "login node share"):
    common.check_shared_dir(None, "--sweep_dir", "tpu")
  assert common.check_shared_dir("/shared/s", "--sweep_dir", "tpu") == "/shared/s"
  assert common.check_shared_dir("gs://b/s", "--sweep_dir", "tpu") == "gs://b/s"


def test_sigterm_stops_the_sweep_and_its_runs_resume(tmp_path):
  config = tmp_path / "sweep_config.py"
  # Scheduled evals and checkpoints only at 50 and 100: the SIGTERM one is what matters.
  config.write_text(SWEEP_CONFIG.replace('"train.steps": 4', '"train.steps": 100').replace(
      '"eval.every": 4, "train.checkpoint_every": 4',
      '"eval.every": 50, "train.checkpoint_every": 50').replace(
      '[2, 4, 3]', '[2]').format(root=ROOT))
  sweep_dir = tmp_path / "sweep"
  args = [sys.executable, "launch/sweep.py", f"--config={config}", "--sweep=three",
          f"--sweep_dir={sweep_dir}"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  log = sweep_dir / "base" / "train.log"
  deadline = time.time() + 300
  while not (log.exists() and "step 20/100" in log.read_text()):
    assert time.time() < deadline and proc.poll() is None, "the run never got going"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "sweep interrupted" in err and "stopped base" in out
  status = checkpoint.read_status(str(sweep_dir / "base"))
  assert status["state"] == "interrupted" and 20 <= status["step"] < 100
  again = _sweep(f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}")
  assert again.returncode == 0 and "resume base" in again.stdout
  assert f"resumed at step {status['step']}" in log.read_text()
  assert checkpoint.read_status(str(sweep_dir / "base"))["state"] == "finished"


GROWING = '''
import os
from hiertx import config as config_lib
from hiertx import grid

def get_config(arg=None):
  return config_lib.load(os.path.join({root!r}, "configs", "compare.py") + ":" + (arg or ""))

def sweep_grow():
  first = grid.product({{"arg.model": ["vanilla"], "train.learning_rate": [1e-3, 2e-3]}})
  return first + grid.product({{"arg.model": ["hourglass"], "train.learning_rate": [1e-3]}}){more}
'''


def test_a_sweep_that_grows_renames_no_run(tmp_path):
  """Runs keep the names sweep.json gave them when an arm that varies a new
  key joins the sweep: the finished ones are still found finished."""
  import sweep as launcher  # launch/sweep.py
  config = tmp_path / "grow.py"
  config.write_text(GROWING.format(root=ROOT, more="[:0]"))
  sweep_dir = str(tmp_path / "s")
  before = launcher.plan(f"{config}:size=tiny", "grow", sweep_dir, [])
  assert [r["name"] for r in before] == ["learning_rate-0.001", "learning_rate-0.002"]
  for r in before:
    os.makedirs(r["workdir"])
    checkpoint.write_status(r["workdir"], "finished", step=300)
  # A new arm varies model, which every run above shared, and the seed.
  config.write_text(GROWING.format(root=ROOT, more=' + [{"arg.model": "hourglass", '
                                   '"train.learning_rate": 1e-3, "train.seed": 1}]'))
  after = launcher.plan(f"{config}:size=tiny", "grow", sweep_dir, [])
  assert [r["name"] for r in after] == [
      "learning_rate-0.001", "learning_rate-0.002", "model-hourglass.learning_rate-0.001",
      "model-hourglass.learning_rate-0.001.seed-1"]
  assert [r["state"] for r in after] == ["finished", "finished", "not started", "not started"]
  r = _sweep(f"--config={config}:size=tiny", "--sweep=grow", f"--sweep_dir={sweep_dir}",
             "--dry_run")
  lines = r.stdout.splitlines()
  assert sum(line.startswith("# finished: ") for line in lines) == 2, r.stdout
  # Without sweep.json the names would follow what varies now.
  fresh = launcher.plan(f"{config}:size=tiny", "grow", str(tmp_path / "fresh"), [], write=False)
  assert fresh[0]["name"] == "model-vanilla.learning_rate-0.001"
