"""Sample pictures: upscaled image grids and 2-D scatter plots, as PNG files."""

import pytest
import torch
from PIL import Image

from n2ce_distill.visualize import MIN_GRID_PIXELS, image_grid, sample_picture, save_samples


def test_image_grid_is_square_upscaled_and_in_unit_range():
    samples = torch.linspace(-3, 3, 64 * 64).reshape(64, 1, 8, 8)  # beyond [-1, 1]: clamped
    grid = image_grid(samples)
    # 8 x 8 tiles of 8 px with 1 px padding: 73 px, upscaled 4x to 292 >= 256
    assert grid.shape == (3, 292, 292) and min(grid.shape[1:]) >= MIN_GRID_PIXELS
    assert grid.min() == 0.0 and grid.max() == 1.0
    # nearest-neighbour upscaling: each 4x4 block is one source pixel
    assert torch.equal(grid[:, :4, :4], grid[:, :1, :1].expand(3, 4, 4))
    big = image_grid(torch.zeros(4, 3, 300, 300))
    assert big.shape[1:] == (603, 603)  # already large: not upscaled


def test_save_samples_writes_grids_and_scatters(tmp_path):
    picture = save_samples(torch.rand(16, 1, 8, 8) * 2 - 1, tmp_path / "a" / "grid.png")
    with Image.open(tmp_path / "a" / "grid.png") as png:
        assert png.size == (259, 259) == tuple(picture.shape[1:])  # 4 tiles of 8 px + 5 px padding = 37, x7
    scatter = sample_picture(torch.randn(100, 2))
    assert scatter.shape == (3, 400, 400) and 0 <= scatter.min() < scatter.max() <= 1
    save_samples(torch.randn(100, 2), tmp_path / "points.png")
    assert (tmp_path / "points.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"samples: expected .* got shape \(3, 4, 5\)"):
        save_samples(torch.zeros(3, 4, 5), tmp_path / "bad.png")
