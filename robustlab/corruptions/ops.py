"""Batched torch building blocks shared by corruptions and perturbation sequences.

Every function takes a float batch (N, C, H, W) on any device and returns one of the same shape;
random ones draw only from the generator they are given (on the batch's device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> torch.Tensor:
    """A normalized 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy's and scikit-image's)."""
    radius = max(1, int(truncate * float(sigma) + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur per channel. ``mode``: ``nearest`` (edge pixels repeat, scipy's and
    scikit-image's ``mode='nearest'``), ``reflect`` (scipy ``reflect``: the edge pixel repeats once,
    F.pad's ``replicate``-free symmetric padding) or ``constant`` (zeros)."""
    if sigma <= 0:
        return x.clone()
    n, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, x.device).to(x.dtype)
    r = (k.numel() - 1) // 2
    y = x.reshape(n * c, 1, h, w)
    y = _pad(y, (r, r, 0, 0), mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = _pad(y, (0, 0, r, r), mode)
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    if mode == "constant":
        return F.pad(x, pad)
    if mode == "nearest":
        return F.pad(x, pad, mode="replicate")
    if mode == "reflect":  # scipy's reflect (d c b a | a b c d | d c b a): flip with the edge repeated
        left, right, top, bottom = pad
        if left or right:
            x = torch.cat([x[..., :left].flip(-1), x, x[..., x.shape[-1] - right:].flip(-1)], dim=-1)
        if top or bottom:
            x = torch.cat([x[..., :top, :].flip(-2), x, x[..., x.shape[-2] - bottom:, :].flip(-2)], dim=-2)
        return x
    raise ValueError(f"unknown padding mode {mode!r}")


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


def shift_gather(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """out[n, :, r, c] = x[n, :, clamp(r + dy[n]), clamp(c + dx[n])]: an integer shift per image with
    edge pixels repeated (ImageMagick's default virtual pixels)."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1)).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1)).clamp(0, w - 1)  # (N, W)
    idx = (rows.unsqueeze(-1) * w + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick's motion blur (``-motion-blur radius x sigma + angle``), per image an angle in
    degrees (N,): a one-sided Gaussian of ``2 * radius + 1`` taps along the angle, taps at rounded
    integer offsets, edges repeated."""
    width = int(2 * round(radius) + 1)
    i = torch.arange(width, dtype=torch.float64, device=x.device)
    weights = torch.exp(-(i * i) / (2.0 * sigma * sigma))
    weights = (weights / weights.sum()).float()
    a = torch.deg2rad(angles_deg.double().to(x.device))
    out = torch.zeros_like(x)
    for k in range(width):
        dx = torch.ceil(k * torch.cos(a) - 0.5).long()
        dy = torch.ceil(k * torch.sin(a) - 0.5).long()
        out += weights[k] * shift_gather(x, dx, dy)
    return out


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(N, mapsize, mapsize) diamond-square height maps in [0, 1] (the fog texture of ImageNet-C and
    MNIST-C): ``mapsize`` a power of two, roughness falling by ``wibbledecay`` per level. The grid
    doubles per level (corners, square centres, the two kinds of diamond points interleaved), with
    wrap-around neighbours as in the original."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    grid = torch.zeros((n, 1, 1), device=device)
    wibble = 100.0

    def wibbled(a: torch.Tensor) -> torch.Tensor:
        u = torch.rand(a.shape, generator=generator, device=device)
        return a / 4 + wibble * (u * 2 * wibble - wibble)

    def interleave(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(a.shape)
        shape[dim] *= 2
        return torch.stack([a, b], dim + 1).reshape(shape)

    while grid.shape[1] < mapsize:
        sq = grid + grid.roll(-1, dims=1)
        centre = wibbled(sq + sq.roll(-1, dims=2))  # the square's centre: its four corners
        across = wibbled(centre + centre.roll(1, dims=1) + grid + grid.roll(-1, dims=2))  # between row neighbours
        down = wibbled(centre + centre.roll(1, dims=2) + grid + grid.roll(-1, dims=1))  # between column neighbours
        grid = interleave(interleave(grid, across, 2), interleave(down, centre, 2), 1)
        wibble /= wibbledecay
    flat = grid.reshape(n, -1)
    grid = grid - flat.min(dim=1).values.view(n, 1, 1)
    return grid / grid.reshape(n, -1).max(dim=1).values.view(n, 1, 1)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """Uniform draws in [low, high)."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def random_sign(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(N,) of -1.0 or +1.0 with equal probability."""
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1
