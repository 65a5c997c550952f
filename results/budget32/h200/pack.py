"""Device side: the run folders under ROOT without their training state, and each kept checkpoint's tokenizer
weights (raw, as the preset measures them) with its header and its counters, as a tar in 15 MiB parts in OUT.
The .safetensors travel byte-shuffled and xz-compressed (lossless; fp32 exponents compress); sha256 of each
original is in manifest.json."""
import hashlib, json, lzma, shutil, subprocess, sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np, torch, safetensors.torch as st
from safetensors import safe_open

root, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = {int(s) for s in sys.argv[3].split(",")}
stage = Path("/tmp/pack") / root.name

def slim(pt: Path) -> dict:
    dest = stage / pt.relative_to(root)
    with safe_open(pt.with_suffix(".safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = st.load_file(pt.with_suffix(".safetensors"))
    data = st.save({k: v for k, v in tensors.items() if k.startswith("models.tokenizer.")}, metadata=meta)
    padded = data + b"\0" * (-len(data) % 4)
    shuffled = np.frombuffer(padded, np.uint8).reshape(-1, 4).T.tobytes()
    Path(str(dest.with_suffix(".safetensors")) + ".shuf.xz").write_bytes(lzma.compress(shuffled, preset=6))
    state = torch.load(pt, weights_only=False, map_location="cpu")
    state.pop("backend", None)  # the optimisers: not needed to measure, and too large to bring back
    torch.save(state, dest)
    return {"file": str(dest.with_suffix(".safetensors").relative_to(stage.parent)), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "step": int(state["step"])}

if __name__ == "__main__":
    shutil.rmtree(stage.parent, ignore_errors=True)
    kept = []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(root)
        if relative.parent.name == "checkpoints" and path.name.startswith("step_"):
            if path.suffix == ".pt" and int(path.stem.split("_")[1]) in keep:
                kept.append(path)
            if path.suffix != ".json" or int(path.stem.split("_")[1]) not in keep:
                continue
        if path.stat().st_size > 4 << 20 or path.name == ".lock":
            continue
        (stage / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, stage / relative)
    with ProcessPoolExecutor(len(kept) or 1) as pool:
        manifest = list(pool.map(slim, kept))
    (stage.parent / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print("kept checkpoints:", *sorted(m["file"] for m in manifest), sep="\n  ")
    subprocess.run(f"tar -C {stage.parent} -cf /tmp/pack.tar . && split -b 15M -d /tmp/pack.tar {out}/pack.tar.part"
                   f" && ls -la {out}", shell=True, check=True)
