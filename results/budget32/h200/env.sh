# Sourced by the device scripts: the carried wheels, the LPIPS weights (kept from the first call), true fp32.
REPO=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if [ -d "$REPO/.dev/lpips" ]; then mkdir -p /root/keep && cp -r "$REPO/.dev/lpips" /root/keep/; fi
export PYTHONPATH=/tmp/site:/root/keep/lpips PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0 OMP_NUM_THREADS=4 WANDB_MODE=disabled
mkdir -p /root/runs/shared
tar -C "$REPO" --exclude=./.dev --exclude=./.whl --exclude=./.git --exclude=./.venv -cf - . | (mkdir -p /root/runs/tree && tar -C /root/runs/tree -xf -)
ln -sfn "$REPO/.dev/data" /root/runs/shared/data
