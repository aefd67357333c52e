"""Sample grids: images as a PNG grid, 2-D points as a scatter plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["save_samples"]


def save_samples(samples: torch.Tensor, path: str | Path) -> Path:
    """Write ``samples`` ((N, C, H, W) images in [-1, 1], or (N, 2) points) to a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        from torchvision.utils import save_image

        save_image((samples + 1) / 2, str(path), nrow=int(math.ceil(math.sqrt(len(samples)))), padding=1)
    elif samples.dim() == 2 and samples.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    else:
        raise ValueError(f"samples: expected (N, C, H, W) images or (N, 2) points, got shape {tuple(samples.shape)}")
    return path
