#!/bin/bash
# The performance targets on one GPU, as one prepared run of about 8 minutes
# (docs/performance.md, "On a GPU"): hiertx vanilla paper14 and hourglass
# paper30 on the fused kernels, the compiled PyTorch reference, and a profile
# of hourglass's step; then, if time is left, the other paper30 models.
#
# Prepare on a machine with a package registry, from the checkout root (the
# .gpu folder is ignored by git and travels with the working tree):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl \
#       flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 ml_collections==1.1.0 nest_asyncio
#   cp <bench>/torch_reference.py .gpu/   # and its peer sources in .gpu/peer-src/
#   # the profile's training data, as an exported cache (the GPU image has no
#   # TensorFlow to build one), at the check's sequence length:
#   python -m hiertx.prepare_data --config=configs/hourglass.py:size=paper30 \
#       --config.data.seq_len=2048 --export=.gpu/cache_2048
# On the GPU machine, from the checkout root:
#   bash experiments/gpu_check.sh [out_dir]      # out_dir defaults to $OUT or /tmp/gpu_check
#
# Every part has its own time limit, so one slow compile costs only its part;
# each part's log (and the profile summary) lands in out_dir, and the run ends
# with one table (experiments/gpu_summary.py): tokens/s, MFU, hourglass /
# vanilla and hiertx / torch.compile, each site's kernel, unfinished parts.
# The shape, the attention settings, the cache and the parts can be changed
# for a dry run on CPU (a test in the suite runs it so):
#   SHAPE=1x256 WIDTH="--set=model.d_model=64 --set=model.num_heads=2 --set=model.mlp_dim=128" \
#   SIZE14=tiny SIZE30=tiny ATTENTION="" STEPS=2 CACHE=/tmp/cache_256 \
#   PARTS="vanilla hourglass profile" bash experiments/gpu_check.sh /tmp/dry
# (PYTHON names the interpreter, default python3; e.g. PYTHON=.venv/bin/python.)
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
SHAPE=${SHAPE:-16x2048}
STEPS=${STEPS:-10}
SIZE14=${SIZE14:-paper14}
SIZE30=${SIZE30:-paper30}
WIDTH=${WIDTH---set=model.d_model=512 --set=model.num_heads=8 --set=model.mlp_dim=2048}
DTYPE=${DTYPE---set=model.dtype=bfloat16}
ATTENTION=${ATTENTION---set=model.attention=cudnn --set=model.attention_fallback=pallas}
CACHE=${CACHE:-.gpu/cache_${SHAPE#*x}}
PARTS=${PARTS:-vanilla hourglass torch_compiled profile top_down bottom_up retina}
PY=${PYTHON:-python3}  # the interpreter with hiertx's dependencies
wanted() { [[ " $PARTS " == *" $1 "* ]]; }

if [ -d .gpu/whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null > "$out/gpu.txt"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$out/gpu.txt"

# part NAME SECONDS COMMAND...: runs COMMAND under a time limit into NAME.log
# and prints the log's table rows and its last error line.
part() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E '^\||attention sites|->' "$out/$name.log" | head -60
  [ $rc -eq 0 ] || { echo "exit $rc"; tail -3 "$out/$name.log"; }
  echo "-- $name: $((SECONDS - t0)) s"
}

# shellcheck disable=SC2206  # the settings are several words on purpose
bench=("$PY" experiments/bench.py --shapes="$SHAPE" --steps="$STEPS" $WIDTH $DTYPE $ATTENTION)

wanted vanilla && part vanilla 150 "${bench[@]}" --run="vanilla.py:size=$SIZE14" \
    --json_out="$out/vanilla.json"
wanted hourglass && part hourglass 180 "${bench[@]}" --run="hourglass.py:size=$SIZE30" \
    --json_out="$out/hourglass.json"
if wanted torch_compiled && [ -f .gpu/torch_reference.py ]; then
  batch=${SHAPE%x*}; length=${SHAPE#*x}
  part torch_compiled 120 bash -c "cd .gpu/peer-src 2>/dev/null || cd .gpu;
    PEER_DIR=. python3 $PWD/.gpu/torch_reference.py $length $batch sdpa_vanilla_compiled"
fi

# The profile of hourglass's step: a few steps of the trainer on the exported
# cache (no TensorFlow needed), traced, and the ops that took the most time.
if wanted profile; then
  if [ -f "$CACHE/manifest.json" ]; then
    prof=/tmp/gpu_check_profile
    rm -rf "$prof"
    settings=()
    for s in $WIDTH $DTYPE $ATTENTION; do settings+=("--config.${s#--set=}"); done
    part profile 150 "$PY" -m hiertx.train --config="configs/hourglass.py:size=$SIZE30" \
        "${settings[@]}" --config.data.batch_size="${SHAPE%x*}" \
        --config.data.seq_len="${SHAPE#*x}" --config.data.cache_dir="$CACHE" \
        --config.train.steps=8 --config.train.profile_steps=5,7 --config.train.log_every=4 \
        --workdir="$prof"
    "$PY" -m hiertx.profiling --workdir="$prof" --top=20 > "$out/profile_top.txt" 2>&1
    head -30 "$out/profile_top.txt"
  else
    echo "error: no exported cache at $CACHE (make it with: python -m hiertx.prepare_data" \
         "--config=configs/hourglass.py:size=$SIZE30 --config.data.seq_len=${SHAPE#*x}" \
         "--export=$CACHE)" | tee "$out/profile.log"
  fi
fi

# What time is left: the other hierarchical models at paper30.
for model in top_down bottom_up retina; do
  wanted "$model" && part "$model" 150 "${bench[@]}" --run="$model.py:size=$SIZE30" \
      --json_out="$out/$model.json"
done
echo "== summary (logs in $out)"
"$PY" experiments/gpu_summary.py "$out"
