"""`pipelines/run.py` for the ranks that tests start under torchrun with launcher=deepspeed, without DeepSpeed's
shared-memory all-reduce: on a CPU, DeepSpeed compiles it (a minute of C++) the first time a machine starts it, and
the 2-rank tests, which train over gloo, never use it. In-process tests patch the same function
(tests/test_global_batch.py)."""
import importlib
import runpy
import sys
from pathlib import Path

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
script = Path(__file__).resolve().parents[1] / "pipelines" / "run.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
