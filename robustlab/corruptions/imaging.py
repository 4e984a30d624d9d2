"""Batched torch building blocks of the corruptions: padding, Gaussian and 2-D filters, motion blur,
linear zoom and box resizing as index/weight tables, HSV, plasma fractals, random draws.

Every function takes and returns float batches (N, C, H, W) (or (N, H, W) maps where said) on the
input's device. Border modes name what the reference code used: ``edge`` (scipy/skimage
``nearest``), ``symmetric`` (scipy ``reflect``: ``d c b a | a b c d``) and ``reflect101`` (OpenCV's
default border and torch's ``reflect``: ``d c b | a b c d``); the Gaussian blur also takes
``constant`` (zeros outside).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

# A source of uniform numbers in [0, 1): shape -> float64 tensor. The corruptions draw through one so
# a fidelity check can feed them the numbers another implementation drew.
Draw = Callable[[tuple[int, ...]], torch.Tensor]


def uniform_draw(generator: torch.Generator | None, device: torch.device) -> Draw:
    """Uniform [0, 1) numbers from ``generator`` (on the generator's device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)

    return draw


def normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers from ``generator``, on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def border_index(length: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Indices into an axis of ``length`` that pad it by ``before``/``after`` samples (any amount)."""
    return fold_index(torch.arange(-before, length + after, device=device), length, mode)


def fold_index(i: torch.Tensor, length: int, mode: str) -> torch.Tensor:
    """Integer positions ``i`` (any values) mapped into [0, length) by the border ``mode``."""
    if mode == "edge" or length == 1:
        return i.clamp(0, length - 1)
    if mode == "symmetric":
        m = i.remainder(2 * length)
        return torch.where(m >= length, 2 * length - 1 - m, m)
    if mode == "reflect101":
        m = i.remainder(2 * length - 2)
        return torch.where(m >= length, 2 * length - 2 - m, m)
    raise ValueError(f"unknown border mode {mode!r}")


def pad_axis(x: torch.Tensor, dim: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Pad axis ``dim`` (-2 or -1) of a 3-D or 4-D tensor by ``before``/``after`` samples."""
    if before == 0 and after == 0:
        return x
    length = x.shape[dim]
    fast = {"edge": "replicate", "reflect101": "reflect"}.get(mode)
    if fast and x.dim() in (3, 4) and (mode == "edge" or max(before, after) < length) and x.is_floating_point():
        pads = (before, after, 0, 0) if dim == -1 else (0, 0, before, after)
        return F.pad(x, pads, mode=fast)
    return x.index_select(dim, border_index(length, before, after, mode, x.device))


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's Gaussian taps: radius ``int(truncate * sigma + 0.5)``, normalized (float64)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def axis_matrix(length: int, taps: torch.Tensor, mode: str) -> torch.Tensor:
    """The (length, length) matrix of a correlation with odd 1-D ``taps`` along an axis padded by
    ``mode`` (any kernel size, the border folded back in; ``constant``: zeros outside)."""
    r = (taps.numel() - 1) // 2
    raw = torch.arange(-r, length + r)
    src = raw.clamp(0, length - 1) if mode == "constant" else border_index(length, r, r, mode, torch.device("cpu"))
    rows = torch.arange(length).view(-1, 1).expand(length, taps.numel())
    cols = src.unfold(0, taps.numel(), 1)
    weights = taps.double().repeat(length)
    if mode == "constant":  # samples outside the image are zeros: their taps drop out
        weights = weights * ((raw >= 0) & (raw < length)).double().unfold(0, taps.numel(), 1).reshape(-1)
    m = torch.zeros(length, length, dtype=torch.float64)
    m.index_put_((rows.reshape(-1), cols.reshape(-1)), weights, accumulate=True)
    return m


@functools.lru_cache(maxsize=128)
def _gaussian_matrix(length: int, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    return axis_matrix(length, gaussian_kernel1d(sigma, truncate), mode)


def apply_axis(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` (out, in) applied along axis ``dim`` (-2 rows or -1 columns) of (..., H, W)."""
    m = matrix.to(x.device, x.dtype)
    return torch.matmul(m, x) if dim == -2 else torch.matmul(x, m.T)


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "edge", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian / scipy gaussian_filter on each channel (default border ``edge``), as
    (H, H) and (W, W) matrices: any batch shape (..., H, W), any dtype."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    x = apply_axis(x, _gaussian_matrix(h, float(sigma), truncate, mode), -2)
    return apply_axis(x, _gaussian_matrix(w, float(sigma), truncate, mode), -1)


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect101") -> torch.Tensor:
    """OpenCV filter2D (correlation, anchor at the centre) of each channel with an odd 2-D kernel."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    xp = pad_axis(pad_axis(x, -2, kh // 2, kh // 2, mode), -1, kw // 2, kw // 2, mode)
    weight = kernel.to(x.device, x.dtype).view(1, 1, kh, kw).expand(n * c, 1, kh, kw)
    out = F.conv2d(xp.reshape(1, n * c, h + kh - 1, w + kw - 1), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def box3(x: torch.Tensor) -> torch.Tensor:
    """OpenCV ``blur(x, (3, 3))``: the mean over each 3x3 window, border reflect101."""
    return filter2d(x, torch.full((3, 3), 1.0 / 9.0))


def cv_gaussian_taps(ksize: int, sigma: float) -> torch.Tensor:
    """OpenCV getGaussianKernel(ksize, sigma) for sigma > 0."""
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(t ** 2) / (2 * sigma * sigma))
    return k / k.sum()


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of ImageNet-C: a disk of ``radius`` on a grid of at least 17x17, smoothed by
    a 3x3 (5x5 above radius 8) Gaussian of ``alias_blur`` (border reflect101), cropped to its support."""
    half = 8 if radius <= 8 else int(radius)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    taps = cv_gaussian_taps(3 if radius <= 8 else 5, alias_blur)
    fold = axis_matrix(disk.shape[0], taps, "reflect101")
    k = fold @ disk @ fold.T
    nz = torch.nonzero(k.abs() > 0)
    r = int((nz - half).abs().max()) if nz.numel() else 0
    return k[half - r:half + r + 1, half - r:half + r + 1].float()


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """Motion blur with a one-sided Gaussian line kernel (the kernel form of ImageMagick's
    ``-motion-blur radius x sigma + angle`` that imagecorruptions uses): ``2 * radius + 1`` copies of
    the image shifted along ``angles`` (degrees, one per image), weighted ``exp(-i^2 / 2 sigma^2)``
    (normalized), border pixels repeated; a copy shifted past the image's size is dropped.

    The images are sorted by angle and padded once by the largest shift; for each copy, the images
    that share its shift are consecutive, so each run of them adds one slice of the padded batch."""
    n, _c, h, w = x.shape
    width = 2 * radius + 1
    taps = torch.exp(-(torch.arange(width, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    taps = (taps / taps.sum()).tolist()
    order = torch.argsort(angles.to(torch.float64).cpu())
    rad = torch.deg2rad(angles.to(torch.float64).cpu()[order]).view(n, 1)
    p0, p1 = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.hypot(p0, p1)
    i = torch.arange(width, dtype=torch.float64).view(1, -1)
    dy = -torch.ceil(i * p0 / hyp - 0.5).long()  # (N, width), in angle order
    dx = -torch.ceil(i * p1 / hyp - 0.5).long()
    alive = ((dy.abs() < h) & (dx.abs() < w)).long().cumprod(1).bool()
    py = int(dy.abs().where(alive, 0).max())
    px = int(dx.abs().where(alive, 0).max())
    order_dev = order.to(x.device)
    xp = F.pad(x.index_select(0, order_dev), (px, px, py, py), mode="replicate")
    out = torch.zeros_like(x)
    key = ((dy + h) * (2 * w + 1) + dx + w).where(alive, -1)
    change = (key[1:] != key[:-1]).T.nonzero().tolist()  # (k, i): image i + 1 starts a new run of copy k
    cuts: list[list[int]] = [[0] for _ in range(width)]
    for k, i in change:
        cuts[k].append(i + 1)
    dy_l, dx_l, alive_l = dy.T.tolist(), dx.T.tolist(), alive.T.tolist()
    for k in range(width):
        for a, b in itertools.pairwise([*cuts[k], n]):
            if alive_l[k][a]:
                top, left = py - dy_l[k][a], px - dx_l[k][a]
                out[a:b].add_(xp[a:b, :, top:top + h, left:left + w], alpha=taps[k])
    return out.index_select(0, torch.argsort(order_dev))


def linear_taps(positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-tap linear interpolation at fractional ``positions`` inside [0, length - 1]."""
    i0 = positions.floor().clamp(0, length - 1)
    frac = (positions - i0).to(torch.float32)
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=length - 1), frac


def resample_axis(x: torch.Tensor, dim: int, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Linear resampling of axis ``dim`` (-2 or -1) with taps from :func:`linear_taps`."""
    i0, i1, frac = taps
    shape = [1] * x.dim()
    shape[dim] = -1
    f = frac.to(x.device, x.dtype).view(shape)
    return x.index_select(dim, i0.to(x.device)) * (1 - f) + x.index_select(dim, i1.to(x.device)) * f


def clipped_zoom_taps(length: int, zoom: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImageNet-C's ``clipped_zoom`` along one axis: crop the centre ``ceil(length / zoom)`` samples,
    zoom them with scipy's ``zoom(order=1)`` (corners aligned) and keep the centre ``length``."""
    crop = math.ceil(length / zoom)
    top = (length - crop) // 2
    out = round(crop * zoom)
    trim = (out - length) // 2
    o = torch.arange(trim, trim + length, dtype=torch.float64)
    src = o * ((crop - 1) / (out - 1)) if out > 1 else torch.zeros_like(o)
    return linear_taps(top + src, length)


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom (N, C, H, W) about its centre by ``zoom`` >= 1, keeping the size."""
    h, w = x.shape[-2:]
    return resample_axis(resample_axis(x, -2, clipped_zoom_taps(h, zoom)), -1, clipped_zoom_taps(w, zoom))


@functools.lru_cache(maxsize=32)
def _zoom_operator(h: int, w: int, zooms: tuple[float, ...], device: str) -> torch.Tensor:
    """Sum over ``zooms`` of :func:`clipped_zoom` as one sparse (H*W, H*W) matrix."""
    rows, cols, vals = [], [], []
    out = (torch.arange(h).view(h, 1) * w + torch.arange(w).view(1, w)).reshape(-1)
    for z in zooms:
        i0, i1, fy = clipped_zoom_taps(h, z)
        j0, j1, fx = clipped_zoom_taps(w, z)
        for ri, wy in ((i0, 1 - fy), (i1, fy)):
            for cj, wx in ((j0, 1 - fx), (j1, fx)):
                rows.append(out)
                cols.append((ri.view(h, 1) * w + cj.view(1, w)).reshape(-1))
                vals.append((wy.view(h, 1) * wx.view(1, w)).reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(cols)])
    op = torch.sparse_coo_tensor(indices, torch.cat(vals), (h * w, h * w), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return op.to_sparse_csr().to(device)


def zoom_sum(x: torch.Tensor, zooms: tuple[float, ...]) -> torch.Tensor:
    """The sum of :func:`clipped_zoom` of (N, C, H, W) over ``zooms``: for images up to 64 x 64 one
    sparse matrix product, for larger ones zoom by zoom with two-tap gathers."""
    n, c, h, w = x.shape
    if h * w > 64 * 64:
        out = torch.zeros_like(x)
        for z in zooms:
            out += clipped_zoom(x, z)
        return out
    op = _zoom_operator(h, w, tuple(zooms), str(x.device)).to(x.dtype)
    return (op @ x.reshape(n * c, h * w).T.contiguous()).T.reshape(n, c, h, w)


def pil_box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's BOX resampling from ``in_size`` to ``out_size`` samples as an (out, in) matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for i in range(lo, hi):
            t = (i - center + 0.5) / filterscale
            if -0.5 <= t < 0.5:
                m[o, i] = 1.0
        m[o] /= m[o].sum()
    return m


def box_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow ``resize(size, Image.BOX)`` of (N, C, H, W) to ``size`` = (height, width)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    mh = pil_box_matrix(h, size[0]).to(x.device, x.dtype)
    mw = pil_box_matrix(w, size[1]).to(x.device, x.dtype)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def sample_bilinear(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` (N, C, H, W) sampled at fractional rows ``ys`` and columns ``xs`` (N, H', W') in pixels by
    bilinear interpolation, outside the image by the border ``mode``: ``reflect101`` (OpenCV's
    default, reflection about the edge pixels: ``grid_sample``'s reflection with corners aligned) or
    ``symmetric`` (scipy's ``reflect``, about the image edges: reflection without)."""
    h, w = x.shape[-2:]
    if mode == "reflect101":
        grid = torch.stack([xs * (2.0 / (w - 1)) - 1, ys * (2.0 / (h - 1)) - 1], -1)
    elif mode == "symmetric":
        grid = torch.stack([(xs + 0.5) * (2.0 / w) - 1, (ys + 0.5) * (2.0 / h) - 1], -1)
    else:
        raise ValueError(f"unknown border mode {mode!r}")
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=mode == "reflect101")


GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def to_gray(x: torch.Tensor, weights: tuple[float, float, float] = GRAY_WEIGHTS) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB (N, 3, H, W) (OpenCV's RGB2GRAY weights); a grey batch is returned."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (weights[0] * r + weights[1] * g + weights[2] * b).unsqueeze(1)


def add_value(x: torch.Tensor, c: float) -> torch.Tensor:
    """skimage's rgb2hsv, value ``v -> min(v + c, 1)``, hsv2rgb, of RGB (N, 3, H, W) in [0, 1]. With hue
    and saturation fixed, RGB is linear in the value, so this scales each pixel by ``v' / v`` (black
    pixels, hue and saturation 0, become grey ``v'``)."""
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp(min=1e-12)), v_new.expand_as(x))


def scale_saturation(x: torch.Tensor, gain: float, offset: float) -> torch.Tensor:
    """skimage's rgb2hsv, saturation ``s -> clip(s gain + offset, 0, 1)``, hsv2rgb, of RGB (N, 3, H, W)
    in [0, 1]. Hue and value fixed, each channel moves from the value linearly with the saturation:
    ``v - (s' / s)(v - x)``; grey pixels (hue 0 by convention) become ``(v, v (1 - s'), v (1 - s'))``."""
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    s = torch.where(v > 0, delta / v.clamp(min=1e-12), torch.zeros_like(v))
    s_new = (s * gain + offset).clamp(0, 1)
    coloured = v - (s_new / s.clamp(min=1e-12)) * (v - x)
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], 1)
    return torch.where(delta > 0, coloured, grey)


def plasma_fractal(n: int, mapsize: int, decay: float, draw: Draw, device: torch.device,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` diamond-square height maps (n, mapsize, mapsize) in [0, 1] (ImageNet-C's and MNIST-C's
    fog): each midpoint is the mean of its neighbours plus ``wibble * U(-wibble, wibble)``, ``wibble``
    starting at 100 and divided by ``decay`` per level. ``dtype``: float64 reproduces the NumPy
    original; float32 is about twice as fast."""
    m = torch.zeros(n, mapsize, mapsize, dtype=dtype, device=device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:
        return a / 4 + wibble * (wibble * (2 * draw(tuple(a.shape)).to(dtype) - 1))

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        acc = corners + corners.roll(-1, 1)
        acc = acc + acc.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(acc)
        centre = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        lt = centre + centre.roll(1, 1) + corners + corners.roll(-1, 2)
        m[:, 0::step, half::step] = wibbled_mean(lt)
        tt = centre + centre.roll(1, 2) + corners + corners.roll(-1, 1)
        m[:, half::step, 0::step] = wibbled_mean(tt)
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def next_power_of_2(v: int) -> int:
    return 1 if v <= 1 else 2 ** (v - 1).bit_length()


def quantize_floor(x: torch.Tensor) -> torch.Tensor:
    """``np.uint8(x * 255) / 255``: the truncation to 8 bits the reference code does mid-way."""
    return torch.floor(x.clamp(0, 1) * 255.0) / 255.0


def canny(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV ``Canny(img, low, high)`` (3x3 Sobel with replicated border, L1 gradient magnitude,
    non-maximum suppression in four sectors, hysteresis with 8-connectivity) of (N, H, W) maps of
    8-bit values; returns a bool edge map."""
    p = pad_axis(pad_axis(img, -2, 1, 1, "edge"), -1, 1, 1, "edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = gx.abs() + gy.abs()
    m = F.pad(mag, (1, 1, 1, 1))
    left, right = m[:, 1:-1, :-2], m[:, 1:-1, 2:]
    up, down = m[:, :-2, 1:-1], m[:, 2:, 1:-1]
    ax, ay = gx.abs(), gy.abs() * 32768
    tg22 = ax * 13573
    horizontal = ay < tg22
    vertical = ay > tg22 + ax * 65536
    same_sign = (gx * gy) >= 0
    diag_a = torch.where(same_sign, m[:, :-2, :-2], m[:, :-2, 2:])  # previous row, column j - s
    diag_b = torch.where(same_sign, m[:, 2:, 2:], m[:, 2:, :-2])  # next row, column j + s
    peak = torch.where(
        horizontal, (mag > left) & (mag >= right),
        torch.where(vertical, (mag > up) & (mag >= down), (mag > diag_a) & (mag > diag_b)),
    )
    weak = peak & (mag > low)
    edges = weak & (mag > high)
    while True:
        grown = weak & _dilate3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """Binary dilation of (N, H, W) by a 3x3 square (outside counts as False)."""
    p = F.pad(mask, (1, 1, 1, 1))
    rows = p[:, :-2] | p[:, 1:-1] | p[:, 2:]
    return rows[..., :-2] | rows[..., 1:-1] | rows[..., 2:]


def truncated_distance(edges: torch.Tensor, limit: int) -> torch.Tensor:
    """Euclidean distance (N, H, W) from each pixel to the nearest ``True`` of ``edges``, capped at
    ``limit`` (exact below it): the distance along each column to the nearest edge (running maxima of
    edge positions from both ends), then the minimum over the row window of ``limit`` pixels of
    ``column distance^2 + offset^2``."""
    n, h, w = edges.shape
    far = float(4 * (h + w + limit))
    pos = torch.arange(h, device=edges.device, dtype=torch.float32).view(1, h, 1).expand(n, h, w)
    above = torch.where(edges, pos, torch.full_like(pos, -far)).cummax(1).values
    below = torch.where(edges, pos, torch.full_like(pos, far)).flip(1).cummin(1).values.flip(1)
    col = torch.minimum(pos - above, below - pos).clamp(max=float(limit + 1))
    sq = F.pad(col * col, (limit, limit), value=float((limit + 1) ** 2))
    best = sq[..., limit:limit + w].clone()
    pair = torch.empty_like(best)
    for k in range(1, limit + 1):
        torch.minimum(sq[..., limit + k:limit + k + w], sq[..., limit - k:limit - k + w], out=pair)
        torch.minimum(best, pair.add_(k * k), out=best)
    return best.sqrt_().clamp_(max=float(limit))


def equalize_hist(img: torch.Tensor) -> torch.Tensor:
    """OpenCV ``equalizeHist`` of each (H, W) map of (N, H, W) 8-bit values."""
    n = img.shape[0]
    flat = img.reshape(n, -1).long()
    total = flat.shape[1]
    hist = torch.zeros(n, 256, device=img.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    first = (hist > 0).float().argmax(1, keepdim=True)
    first_count = hist.gather(1, first)
    cdf = hist.cumsum(1)
    rest = total - first_count
    scale = torch.where(rest > 0, 255.0 / rest.clamp(min=1), torch.zeros_like(rest))
    lut = torch.round((cdf - cdf.gather(1, first)) * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=img.device).view(1, -1) < first, torch.zeros_like(lut), lut)
    out = lut.gather(1, flat).reshape(img.shape)
    return torch.where((rest == 0).view(n, *([1] * (img.dim() - 1))), img, out)
