"""Comparison grids: every original above its reconstruction, also when the last row is short."""
import numpy as np
import torch
from PIL import Image

from shared.data.image_files import save_comparison_grid


def test_each_original_sits_above_its_reconstruction(tmp_path):
    size, gap, columns = 4, 2, 3
    originals = torch.linspace(-1, 0, 5).view(5, 1, 1, 1).expand(5, 3, size, size)  # 5 images: last row short
    reconstructions = -originals.flip(0) * 0.5
    grid = np.asarray(Image.open(save_comparison_grid(originals, reconstructions, tmp_path / "g.png", columns)))
    step = size + gap

    def tile(row, column):
        return grid[gap + row * step, gap + column * step, 0]

    for index in range(5):
        pair_row, column = divmod(index, columns)
        expected_original = round((originals[index, 0, 0, 0].item() + 1) * 127.5)
        expected_reconstruction = round((reconstructions[index, 0, 0, 0].item() + 1) * 127.5)
        assert tile(2 * pair_row, column) == expected_original
        assert tile(2 * pair_row + 1, column) == expected_reconstruction
    assert grid.shape[:2] == (gap + 4 * step, gap + columns * step)
