"""Image grids: tiles in rows with black gaps; every original above its reconstruction, also when the last row is short."""
import numpy as np
import torch
from PIL import Image

from shared.data.image_files import save_comparison_grid, tiled


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


def test_a_grid_tiles_row_by_row_with_black_gaps_also_for_a_short_last_row():
    images = torch.arange(1, 6, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 6)  # image i is all i
    grid = tiled(images, columns=3)
    assert grid.shape == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2), 3)
    for index in range(5):
        top, left = 2 + (index // 3) * 6, 2 + (index % 3) * 8
        assert (grid[top:top + 4, left:left + 6] == index + 1).all()
    assert grid[8:12, 18:24].sum() == 0  # the missing sixth image is black
    assert grid[:2].sum() == grid[:, :2].sum() == grid[6:8].sum() == grid[:, 8:10].sum() == 0
    assert tiled(images[:1], columns=8).shape == (8, 10, 3)  # one image: one column
