"""Sample pictures: images as an upscaled grid, 2-D points as a scatter plot; saved as PNG, logged as images."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["MIN_GRID_PIXELS", "image_grid", "sample_picture", "save_samples"]

MIN_GRID_PIXELS = 256  # grids are upscaled (nearest neighbour) to at least this size: 8x8 digits are 73 px raw


def image_grid(samples: torch.Tensor) -> torch.Tensor:
    """A square grid of (N, C, H, W) images in [-1, 1] as one (C, H', W') image in [0, 1], upscaled by an integer
    factor to at least :data:`MIN_GRID_PIXELS` on its shorter side."""
    from torchvision.utils import make_grid

    grid = make_grid((samples.detach().float().cpu().clamp(-1, 1) + 1) / 2,
                     nrow=int(math.ceil(math.sqrt(len(samples)))), padding=1, pad_value=1.0)
    factor = math.ceil(MIN_GRID_PIXELS / min(grid.shape[1:]))
    return grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2) if factor > 1 else grid


def _scatter(points: torch.Tensor) -> torch.Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)  # no pyplot: the global backend is never touched
    ax = fig.add_subplot()
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8).reshape(*canvas.get_width_height()[::-1], 4)
    return rgba[..., :3].permute(2, 0, 1).float() / 255


def sample_picture(samples: torch.Tensor) -> torch.Tensor:
    """(3 or C, H, W) picture in [0, 1] of ``samples``: (N, C, H, W) images in [-1, 1], or (N, 2) points."""
    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        return image_grid(samples)
    if samples.dim() == 2 and samples.shape[1] == 2:
        return _scatter(samples)
    raise ValueError(f"samples: expected (N, C, H, W) images or (N, 2) points, got shape {tuple(samples.shape)}")


def save_samples(samples: torch.Tensor, path: str | Path) -> torch.Tensor:
    """Write the :func:`sample_picture` of ``samples`` to a PNG at ``path``; returns the picture."""
    from torchvision.utils import save_image

    picture = sample_picture(samples)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(picture, str(path))
    return picture
