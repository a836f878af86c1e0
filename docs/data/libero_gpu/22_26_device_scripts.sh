# ==== .bundle/dev_s18.sh (call 1; run as: bash .bundle/dev_s18.sh, or timeout 470 bash .bundle/dev_s18.sh for call 3; carry .bundle .gl [.old])
#!/usr/bin/env bash
# session 18 device run: LIBERO throughput of the kit's env path (OpenVLA conventions inside the env)
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
bash .bundle/setup.sh /tmp/site >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD LIBERO_CONFIG_PATH=/tmp/site/.libero MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json PYTHONUNBUFFERED=1
F='SyntaxWarning|task orders|robosuite WARNING|^\s*$|invalid escape'
{ date; nvidia-smi -L; lscpu | grep -E '^CPU\(s\)|Model name'; echo "code: working tree of $(git rev-parse --short HEAD) + OpenVLALiberoEnv (uncommitted)"; } > $OUT/22_date.txt
start=$(date +%s)
python3 bench/libero_env_breakdown.py --steps 20 --reps 3 2>&1 | grep -vE "$F" | tee $OUT/22_breakdown.txt
python3 bench/libero_env_throughput.py --num_envs 16 --steps 150 --reps 5 --render 256 --variants worker --raw_pipeline 2>&1 | grep -vE "$F" | tee $OUT/23_throughput_16envs.txt
left=$(( 560 - ($(date +%s) - start) ))
echo "seconds left for a second call: $left"
if [ $left -gt 150 ]; then
  timeout $left python3 bench/libero_env_throughput.py --num_envs 16 --steps 150 --reps 5 --render 256 --variants worker 2>&1 | grep -vE "$F" | tee $OUT/24_throughput_16envs.txt
fi
date >> $OUT/22_date.txt
# ==== .bundle/dev_s18b.sh (call 2; run as: bash .bundle/dev_s18b.sh, or timeout 470 bash .bundle/dev_s18b.sh for call 3; carry .bundle .gl [.old])
#!/usr/bin/env bash
# session 18, call 2: A/B of the kit's LIBERO env path, this working tree (OpenVLA conventions inside
# the env, one NonTensorData for a batch's common instruction) vs 8e30676 (.old: TransformedEnv
# workers, per-row NonTensorStack), alternating invocations of the same bench, 2 reps each
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
bash .bundle/setup.sh /tmp/site >/dev/null || exit 1
export LIBERO_CONFIG_PATH=/tmp/site/.libero MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json PYTHONUNBUFFERED=1
F='SyntaxWarning|task orders|robosuite WARNING|^\s*$|invalid escape|__logo__'
ROOT=$PWD
{ date; nvidia-smi -L; lscpu | grep -E '^CPU\(s\)|Model name'; echo "new: working tree of $(git rev-parse --short HEAD) + session-18 changes; old: 8e30676"; } > $OUT/25_date.txt
for round in 1 2; do
  for which in new old; do
    dir=$ROOT; [ $which = old ] && dir=$ROOT/.old
    echo "=== round $round, $which ($dir), $(date +%T)"
    (cd $dir && PYTHONPATH=/tmp/site:$dir python3 bench/libero_env_throughput.py --num_envs 16 --steps 150 --reps 2 --render 256 --variants worker 2>&1 | grep -vE "$F")
  done
done 2>&1 | tee $OUT/25_ab_throughput_16envs.txt
date >> $OUT/25_date.txt
# ==== .bundle/dev_s18c.sh (call 3; run as: bash .bundle/dev_s18c.sh, or timeout 470 bash .bundle/dev_s18c.sh for call 3; carry .bundle .gl [.old])
#!/usr/bin/env bash
# session 18, call 2: A/B of the kit's LIBERO env path, this working tree (OpenVLA conventions inside
# the env, one NonTensorData for a batch's common instruction) vs 8e30676 (.old: TransformedEnv
# workers, per-row NonTensorStack), alternating invocations of the same bench, 2 reps each
SECONDS=0; for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
bash .bundle/setup.sh /tmp/site >/dev/null || exit 1
export LIBERO_CONFIG_PATH=/tmp/site/.libero MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json PYTHONUNBUFFERED=1
F='SyntaxWarning|task orders|robosuite WARNING|^\s*$|invalid escape|__logo__'
ROOT=$PWD
{ date; nvidia-smi -L; lscpu | grep -E '^CPU\(s\)|Model name'; echo "new: working tree of $(git rev-parse --short HEAD) + session-18 changes; old: 8e30676"; } > $OUT/26_date.txt
for round in 3 4; do
  for which in $([ $round = 3 ] && echo new old || echo new); do
    dir=$ROOT; [ $which = old ] && dir=$ROOT/.old
    echo "=== round $round, $which ($dir), $(date +%T)"
    (cd $dir && PYTHONPATH=/tmp/site:$dir python3 bench/libero_env_throughput.py --num_envs 16 --steps 150 --reps 2 --render 256 --variants worker 2>&1 | grep -vE "$F")
  done
done 2>&1 | tee $OUT/26_ab_throughput_16envs.txt
date >> $OUT/26_date.txt
