"""Builds .gpu_wheels/, the wheels benchmarks/gpu_check.py needs on a GPU machine without network, and prints the
command that runs the check there.

    .venv/bin/python benchmarks/gpu_wheels.py

The GPU machine has Python 3.12 and its own torch and torchvision, with what they require. The check needs the rest
of what it imports: the script runs the check's CPU dry run in a fresh interpreter, takes the distributions it
imported (`packages` in its JSON, at the versions this checkout was tested with), leaves out torch, torchvision,
everything they require (by this machine's installed metadata) and this project (the check runs the carried
checkout, whose configs are no part of a wheel), and downloads a wheel of each for CPython 3.12 on manylinux
x86_64; a distribution published as an sdist only is built here into a wheel, which must be pure Python. The folder
holds one version of each, `requirements.txt` (the project's range where pyproject.toml declares one, the name
otherwise: pip keeps what the machine has when it fits) and must stay within 60 MiB, so that the checkout and it
travel together within the device tool's 64 MiB.

The device tool's `run`, as printed at the end (carry [".gpu_wheels"], timeout_s 600):

    python3 -m pip install -q --no-index --find-links .gpu_wheels -r .gpu_wheels/requirements.txt &&
        set -o pipefail && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

writes $OUT/gpu_check.json and its log.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu_wheels"
LIMIT_MIB = 60
PROJECT = "epsvae-toolkit"
# What the GPU machine brings: its own torch and torchvision, and what they require.
MACHINE_OWN = ("torch", "torchvision")
# CPython 3.12 on x86-64 Linux; pip matches each manylinux tag exactly, so the usual ones are named.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *(f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                            "manylinux2014_x86_64", "manylinux1_x86_64"))]
COMMAND = ("python3 -m pip install -q --no-index --find-links .gpu_wheels -r .gpu_wheels/requirements.txt && "
           "set -o pipefail && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py 2>&1 | tee $OUT/gpu_check.log")


def imported_by_the_check() -> dict[str, str]:
    """{distribution: version} that a dry run of the check imports (its report's `packages`)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "gpu_check.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(report)],
                       cwd=ROOT, check=True)
        return json.loads(report.read_text())["packages"]


def required_by(names: tuple[str, ...]) -> set[str]:
    """`names` and every distribution they require, recursively, by the installed metadata (requirements of
    extras left out), as canonical names."""
    found, pending = set(), [canonicalize_name(name) for name in names]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return found


def to_carry(imported: dict[str, str]) -> dict[str, str]:
    """The imported distributions the GPU machine lacks by assumption: all but its own and this project."""
    left_out = required_by(MACHINE_OWN) | {PROJECT}
    return {name: version for name, version in imported.items()
            if canonicalize_name(name) not in left_out and not canonicalize_name(name).startswith("nvidia-")}


def fetch_wheel(name: str, version: str) -> None:
    """The wheel of name==version for the target into WHEELS; from its sdist, built here, where there is none (it
    must come out pure Python, or it would not run there)."""
    pip = [sys.executable, "-m", "pip", "-q"]
    downloaded = subprocess.run([*pip, "download", "--no-deps", *TARGET, "-d", str(WHEELS), f"{name}=={version}"],
                                capture_output=True, text=True)
    if downloaded.returncode == 0:
        return
    print(f"{name}=={version} has no wheel for the target: building one from its sdist", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([*pip, "wheel", "--no-deps", "-w", folder, f"{name}=={version}"], check=True)
        (wheel,) = Path(folder).glob("*.whl")
        if not wheel.name.endswith("-none-any.whl"):
            raise SystemExit(f"{name}=={version} has no wheel for Python 3.12 on manylinux x86_64, and its sdist "
                             f"builds into a platform wheel here ({wheel.name})")
        shutil.move(wheel, WHEELS / wheel.name)


def requirement_lines(names: list[str]) -> list[str]:
    """pyproject.toml's requirement of each distribution, or its bare name for what the project does not declare."""
    declared = {canonicalize_name(Requirement(line).name): line
                for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    return [declared.get(canonicalize_name(name), name) for name in names]


def main() -> None:
    carried = to_carry(imported_by_the_check())
    shutil.rmtree(WHEELS, ignore_errors=True)  # one version of each: two would stop the whole installation
    WHEELS.mkdir()
    for name, version in carried.items():
        fetch_wheel(name, version)
    (WHEELS / "requirements.txt").write_text("\n".join(requirement_lines(list(carried))) + "\n")
    size = sum(path.stat().st_size for path in WHEELS.iterdir()) / 2**20
    for path in sorted(WHEELS.iterdir()):
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{size:8.2f} MiB  in {WHEELS.relative_to(ROOT)}/ (at most {LIMIT_MIB} MiB)")
    if size > LIMIT_MIB:
        raise SystemExit(f"{WHEELS} holds {size:.1f} MiB, more than {LIMIT_MIB} MiB")
    print("\nOn the GPU machine, the device tool's run with carry [\".gpu_wheels\"] and timeout_s 600:\n\n" + COMMAND)


if __name__ == "__main__":
    main()
