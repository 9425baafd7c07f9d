#!/bin/bash
# The performance targets on one GPU, as one prepared run of about 8 minutes
# (README "Performance", "On a GPU"): hiertx vanilla paper14 and hourglass
# paper30 on the fused kernels, the compiled PyTorch reference, and a profile
# of hourglass's step; then, if time is left, the other paper30 models.
#
# Prepare on a machine with a package registry, from the checkout root (the
# .gpu folder is ignored by git and travels with the working tree):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl \
#       flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 ml_collections==1.1.0 nest_asyncio
#   cp <bench>/torch_reference.py .gpu/   # and its peer sources in .gpu/peer-src/
# On the GPU machine, from the checkout root:
#   bash experiments/gpu_check.sh [out_dir]      # out_dir defaults to $OUT or /tmp/gpu_check
#
# Every part has its own time limit, so one slow compile costs only its part;
# each part's log (and the profile summary) lands in out_dir. The shape and
# the attention settings can be changed for a dry run on CPU:
#   SHAPE=1x256 WIDTH="--set=model.d_model=64 --set=model.num_heads=2 --set=model.mlp_dim=128" \
#   SIZE14=tiny SIZE30=tiny ATTENTION="" STEPS=2 bash experiments/gpu_check.sh /tmp/dry
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
SHAPE=${SHAPE:-16x2048}
STEPS=${STEPS:-10}
SIZE14=${SIZE14:-paper14}
SIZE30=${SIZE30:-paper30}
WIDTH=${WIDTH:---set=model.d_model=512 --set=model.num_heads=8 --set=model.mlp_dim=2048}
DTYPE=${DTYPE:---set=model.dtype=bfloat16}
ATTENTION=${ATTENTION---set=model.attention=cudnn --set=model.attention_fallback=pallas}

if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null > "$out/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$out/gpu.txt"

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
bench=(python3 experiments/bench.py --shapes="$SHAPE" --steps="$STEPS" $WIDTH $DTYPE $ATTENTION)

part vanilla 150 "${bench[@]}" --run="vanilla.py:size=$SIZE14"
part hourglass 180 "${bench[@]}" --run="hourglass.py:size=$SIZE30"
if [ -f .gpu/torch_reference.py ]; then
  batch=${SHAPE%x*}; length=${SHAPE#*x}
  part torch_compiled 120 bash -c "cd .gpu/peer-src 2>/dev/null || cd .gpu;
    PEER_DIR=. python3 $PWD/.gpu/torch_reference.py $length $batch sdpa_vanilla_compiled"
fi

# The profile of hourglass's step: a few steps of the trainer on the built-in
# corpus, traced, and the ops that took the most time.
prof=/tmp/gpu_check_profile
rm -rf "$prof"
settings=()
for s in $WIDTH $DTYPE $ATTENTION; do settings+=("--config.${s#--set=}"); done
part profile 150 python3 -m hiertx.train --config="configs/hourglass.py:size=$SIZE30" \
    "${settings[@]}" --config.data.batch_size="${SHAPE%x*}" --config.data.seq_len="${SHAPE#*x}" \
    --config.train.steps=8 --config.train.profile_steps=5,7 --config.train.log_every=4 \
    --workdir="$prof"
python3 -m hiertx.profiling --workdir="$prof" --top=20 2>&1 | tee "$out/profile_top.txt"

# What time is left: the other hierarchical models at paper30.
for model in top_down bottom_up retina; do
  part "$model" 150 "${bench[@]}" --run="$model.py:size=$SIZE30"
done
echo "logs in $out"
