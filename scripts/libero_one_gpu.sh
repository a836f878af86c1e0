#!/usr/bin/env bash
# LIBERO on one GPU, from nothing: scripted demonstrations -> SFT of a small OpenVLA -> CRL-VLA
# and Seq-FT on LIBERO-Goal tasks 8 -> 1 -> 4 (2 seeds each) -> the table. docs/libero_one_gpu.md.
#
#   bash scripts/libero_one_gpu.sh demos   # 50 scripted demos per task, 16 processes (EGL)
#   bash scripts/libero_one_gpu.sh sft     # SFT; rerun until it prints "sft: complete"
#   bash scripts/libero_one_gpu.sh rl      # CRL and Seq-FT x seeds 0 1; rerun until "rl: complete"
#   bash scripts/libero_one_gpu.sh vla_rl  # VLA-RL: the RPRM on the demos' pseudo-labels, then one shaped run; rerun until "vla_rl: complete"
#   bash scripts/libero_one_gpu.sh table   # R matrices, FAR/BWT/FT/F, plots
#   bash scripts/libero_one_gpu.sh all     # demos, sft, rl in turn inside one TIME_LIMIT; rerun until "rl: complete"
#
# Every command stops itself inside 10 minutes (--time_limit, default 540 s; TIME_LIMIT=... to
# change; RL_PARALLEL=2 runs two RL runs at a time) and the next call of the same stage resumes from each run's newest checkpoint. Demos land in
# data/libero_goal_scripted/, runs in runs/libero_one_gpu/ (the paths the two configs name);
# each run's wall time adds up in its wall_s.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=runs/libero_one_gpu          # configs/sft_libero_small.yaml exports to $OUT/sft_policy
DEMOS=data/libero_goal_scripted   # configs/sft_libero_small.yaml's data.demos
LIMIT=${TIME_LIMIT:-540}
export MUJOCO_GL=${MUJOCO_GL:-egl}

# the RL stages start from the SFT export and read its score (b)
sft_done() {
  test -f "$OUT/sft_policy/config.json" || { echo "$1: no $OUT/sft_policy (run the sft stage)"; exit 1; }
  grep -qs '"complete": true' "$OUT/sft/seed0/metrics.json" \
    || { echo "$1: the SFT policy's score is not complete in $OUT/sft/seed0/metrics.json (run the sft stage)"; exit 1; }
}

stage=${1:?usage: libero_one_gpu.sh demos|sft|rl|vla_rl|table|all}
case "$stage" in
  demos)
    if [ -f "$DEMOS/collection.json" ]; then echo "demos: complete ($DEMOS)"; exit 0; fi
    rm -rf "$DEMOS"
    "$PY" scripts/write_libero_demos.py --tasks 8 1 4 --demos 50 --out "$DEMOS" --size 128 --processes 16
    echo "demos: complete ($DEMOS)" ;;
  sft)
    "$PY" scripts/sweep.py --config configs/sft_libero_small.yaml --method sft= --seeds 0 --out "$OUT" \
        --time_limit "$LIMIT" --resume \
    && echo "sft: complete ($OUT/sft_policy)" ;;
  rl)
    sft_done rl
    "$PY" scripts/sweep.py --config configs/crl_libero_small.yaml --method crl= \
        --method seq_ft=configs/ablations/seq_ft.yaml --branch seq_ft=crl --seeds 0 1 --out "$OUT/rl" \
        --parallel "${RL_PARALLEL:-1}" \
        --time_limit "$LIMIT" --resume \
    && echo "rl: complete ($OUT/rl)" ;;
  vla_rl)
    sft_done vla_rl
    if [ ! -f "$OUT/rprm/trained" ]; then   # configs/rprm_libero_small.yaml writes $OUT/rprm
      rm -rf "$OUT/rprm" "$OUT/rprm_data"
      "$PY" scripts/train_rprm.py --config configs/rprm_libero_small.yaml > "$OUT/rprm.log" 2>&1 \
        || { tail -20 "$OUT/rprm.log"; echo "vla_rl: the RPRM's training failed ($OUT/rprm.log)"; exit 1; }
      grep "held-out episodes" "$OUT/rprm.log" | tee "$OUT/rprm/trained"
    fi
    "$PY" scripts/sweep.py --config configs/crl_libero_small.yaml --method vla_rl=configs/vla_rl_libero_small.yaml \
        --seeds 0 --out "$OUT/vla_rl" --time_limit "$LIMIT" --resume \
    && echo "vla_rl: complete ($OUT/vla_rl)" ;;
  all)
    start=$(date +%s)
    left() { echo $(( LIMIT - ($(date +%s) - start) )); }
    bash "$0" demos
    TIME_LIMIT=$(left) bash "$0" sft
    TIME_LIMIT=$(left) bash "$0" rl ;;
  table)
    "$PY" scripts/results_table.py "$OUT/rl" --out "$OUT/rl/table.md"
    "$PY" scripts/plots.py "$OUT/rl" --out "$OUT/rl/figures"
    cat "$OUT/rl/table.md"
    if [ -d "$OUT/vla_rl" ]; then
      "$PY" scripts/results_table.py "$OUT/vla_rl" --out "$OUT/vla_rl/table.md" && cat "$OUT/vla_rl/table.md"
    fi ;;
  *) echo "unknown stage $stage: demos|sft|rl|vla_rl|table|all" >&2; exit 2 ;;
esac
