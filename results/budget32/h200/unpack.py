"""Here: the parts from pack.py into DEST (the runs' output_root), each .safetensors restored and checked."""
import hashlib, json, lzma, subprocess, sys
from pathlib import Path
import numpy as np
parts, dest = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run(f"cat {parts}/pack.tar.part* | tar -C {dest.parent} -xf -", shell=True, check=True)
for entry in json.loads((dest.parent / "manifest.json").read_text()):
    target = dest.parent / entry["file"]
    packed = Path(str(target) + ".shuf.xz")
    shuffled = np.frombuffer(lzma.decompress(packed.read_bytes()), np.uint8)
    data = shuffled.reshape(4, -1).T.tobytes()[: entry["bytes"]]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], target
    target.write_bytes(data)
    packed.unlink()
    print("restored", target)
