# Call 1: the LPIPS weights arrive (kept on the machine for call 2); environment check.
source .dev/bin/env.sh
nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv
python3 -c "import numpy, torch, PIL; print('numpy', numpy.__version__, 'torch', torch.__version__, 'PIL', PIL.__version__)"
cd /root/runs/tree
python3 -c "
from shared.metrics.lpips import LPIPS
import torch
m = LPIPS('vgg').cuda(); x = torch.rand(2, 3, 32, 32, device='cuda') * 2 - 1
print('lpips ok', m(x, x.flip(0)).tolist())
import pipelines.budget; print('imports ok')"
