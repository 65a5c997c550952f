"""Imagenette at 32 px for the device: every image as this toolkit's loader preprocesses it (to_rgb, ADM crop to
32 px), saved losslessly as PNG under its original name; checks that the loader reads back identical tensors."""
import hashlib, shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
from shared.data.decoding import decode_image
from shared.data.transforms import center_crop_adm, preprocess
src = Path("../shared/data/imagenette2-224"); dst = Path(".dev/data/imagenette2-224"); res = 32
dst.mkdir(parents=True, exist_ok=True); shutil.copy(src / "classes.tsv", dst / "classes.tsv")
digest = hashlib.sha256()
for split in ("train", "val"):
    for path in sorted((src / split).glob("*/*")):
        out = dst / split / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        image = decode_image(path, str(path))
        small = center_crop_adm(image, res)
        small.save(out, format="PNG")
        a = preprocess(image, res, False).numpy(); b = preprocess(decode_image(out, str(out)), res, False).numpy()
        assert np.array_equal(a, b), path
        if split == "train":
            digest.update(a.tobytes())
print("train digest", digest.hexdigest())
