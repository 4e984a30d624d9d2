"""Geometric warps (affine maps in pixel coordinates, as scikit-image's ``warp``) and per-image random
draws, shared by the MNIST-C corruptions and the perturbation sequences. Filters, blurs and textures
live in :mod:`robustlab.corruptions.imaging`.

Warps take a float batch (N, C, H, W) on any device and return one of the same shape; random draws
come only from the generator they are given (on the batch's device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def affine_warp(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Warp each image by a 2x3 matrix in pixel coordinates (column, row) that maps an output pixel to
    the input point it samples (scikit-image's ``warp(x, inverse_map)``): bilinear, zeros outside.
    ``inverse``: (N, 2, 3) or (2, 3)."""
    n, _, h, w = x.shape
    inverse = inverse.to(device=x.device, dtype=torch.float32).expand(n, 2, 3)
    cols = torch.arange(w, dtype=torch.float32, device=x.device)
    rows = torch.arange(h, dtype=torch.float32, device=x.device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    pts = torch.stack([cc, rr, torch.ones_like(cc)], dim=-1).reshape(1, -1, 3)  # (1, HW, 3)
    src = pts @ inverse.transpose(1, 2)  # (N, HW, 2): (col, row)
    gx = src[..., 0] * (2.0 / max(w - 1, 1)) - 1.0
    gy = src[..., 1] * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(n, h, w, 2)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def centered(linear: torch.Tensor, size_h: int, size_w: int) -> torch.Tensor:
    """(N, 2, 3) matrices of the linear maps ``linear`` (N, 2, 2) about the image centre (the centre
    pixel maps to itself)."""
    centre = torch.tensor([(size_w - 1) / 2.0, (size_h - 1) / 2.0], device=linear.device, dtype=linear.dtype)
    shift = centre - linear @ centre
    return torch.cat([linear, shift.unsqueeze(-1)], dim=-1)


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) rotation matrices [[cos, -sin], [sin, cos]] for angles in radians (N,)."""
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """Uniform draws in [low, high)."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def random_sign(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(N,) of -1.0 or +1.0 with equal probability."""
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1
