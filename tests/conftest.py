import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette2-224"

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def imagenette() -> Path:
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"the ImageNet subset is not at {IMAGENETTE}")
    return IMAGENETTE
