import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette2-224"

os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(items):
    """The slow tier first, the short tests last: under README's `-n 2 --dist worksteal` an idle worker takes over
    the other's queue from its end, so the two finish together rather than one running a long test alone at the end
    (a stable sort: the order within each tier stays)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    from tests.helpers import THREADS
    import torch

    torch.set_num_threads(THREADS)


@pytest.fixture
def imagenette() -> Path:
    if not (IMAGENETTE / "train").is_dir():
        pytest.skip(f"the ImageNet subset is not at {IMAGENETTE}")
    return IMAGENETTE


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the stages run in CI: several threads on 2 shared cores only contend."""
    from tests.helpers import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def data_log():
    """Records of the data logger (it may not propagate to the root logger once a run has set up logging)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("epsvae.data")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
