"""The torch path of augmentation: one AugmentParams per sample applied with ``grid_sample``.

The same source positions as the numpy path (:func:`unetcli.resample.position_factors`) and the same
kernels (bicubic with a = -0.75, bilinear, nearest), so the two agree to float32 rounding; training
on a GPU augments its batches here, on the device. torch is imported inside the functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from unetcli.augparams import AugmentConfig, AugmentParams, check_range, sample_params
from unetcli.errors import ConfigError, ImageShapeError, LabelError
from unetcli.resample import position_factors, upsampling

if TYPE_CHECKING:
    import torch


def apply_params_torch(params: list[AugmentParams], images: "torch.Tensor",
                       targets: "torch.Tensor | None" = None, weights: "torch.Tensor | None" = None, *,
                       out_size: int | None = None, order: int = 3,
                       value_range: tuple[float, float] = (0.0, 1.0),
                       generator: "torch.Generator | None" = None,
                       ) -> tuple["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"]:
    """Apply one AugmentParams per sample with ``grid_sample``, on the tensors' device.

    ``images`` ``(B, C, H, W)`` are the windows themselves (origin 0, mirrored at their own edges).
    ``targets`` and ``weights`` ``(B, h, w)`` are centred on them (``h = H`` is exact; a smaller map is
    mirrored at its own edge where the deformation reaches past it). They come back as the centred
    ``(out_size, out_size)`` crop (default: ``h, w``). Images: bicubic (Keys, a = -0.75) for ``order=3``,
    bilinear for 1; targets nearest (dtype kept), weights bilinear. ``generator`` draws the noise.
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 4:
        raise ImageShapeError(f"images must be (B, C, H, W), not of shape {tuple(images.shape)}")
    b = images.shape[0]
    if len(params) != b:
        raise ConfigError(f"{len(params)} parameter sets for a batch of {b}")
    lo, hi = check_range(value_range)
    grid = _sampling_grid(params, tuple(images.shape[2:]), images.device)
    mode = "bicubic" if order == 3 else "bilinear"
    out = F.grid_sample(images.to(torch.float32), grid, mode=mode, padding_mode="reflection",
                        align_corners=True)
    out = _gray_values(out, params, lo, hi, generator)
    tgt = wts = None
    if targets is not None:
        _check_maps(targets, "targets", images, out_size)
        if targets.dtype in (torch.int32, torch.int64) and targets.numel() and (
                int(targets.max()) >= 2 ** 24 or int(targets.min()) <= -2 ** 24):
            raise LabelError("target values must lie within +-2**24 for the torch path")
        tgt = _sample_maps(grid, targets, out_size, "nearest").round().to(targets.dtype)
    if weights is not None:
        _check_maps(weights, "weights", images, out_size)
        wts = _sample_maps(grid, weights, out_size, "bilinear")
    return out, tgt, wts


def _normaliser(h: int, w: int) -> np.ndarray:
    """Pixels (x, y) to grid_sample's [-1, 1], -1 and 1 at the edge pixels' centres (align_corners)."""
    return np.array([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])


def _sampling_grid(params: list[AugmentParams], shape: tuple[int, int], dev: "torch.device") -> "torch.Tensor":
    """The (B, H, W, 2) grid of (x, y) source positions that grid_sample wants.

    Built from the same factors as :func:`unetcli.resample.source_coordinates`, normalised factor by
    factor: positions r[i] + c[j] + (p @ u.T)[i, j] per axis, u the shared spline matrix.
    """
    import torch

    h, w = shape
    f32 = torch.float32
    factors = [position_factors(p, (h, w), (0.0, 0.0)) for p in params]
    norm = _normaliser(h, w)
    rows = np.stack([np.stack([f[1][0], f[0][0]], -1) for f in factors]) * norm - 1.0   # (B, H, 2)
    cols = np.stack([np.stack([f[1][1], f[0][1]], -1) for f in factors]) * norm         # (B, W, 2)
    grid = (torch.tensor(rows, device=dev, dtype=f32)[:, :, None, :]
            + torch.tensor(cols, device=dev, dtype=f32)[:, None, :, :])
    ranks = {f[0][2].shape[1] for f in factors} - {0}
    if len(ranks) > 1:
        raise ConfigError("all samples of a batch need the same elastic grid")
    if ranks:
        g = ranks.pop()
        elastic = np.stack([np.stack([f[1][2], f[0][2]], -1) if f[0][2].shape[1] else np.zeros((h, g, 2))
                            for f in factors]) * norm                              # (B, H, g, 2)
        ux = torch.tensor(upsampling(g, w), device=dev, dtype=f32)               # (W, g)
        grid = grid + torch.einsum("bhgc,wg->bhwc", torch.tensor(elastic, device=dev, dtype=f32), ux)
    return grid


def _gray_values(out: "torch.Tensor", params: list[AugmentParams], lo: float, hi: float,
                 generator: "torch.Generator | None") -> "torch.Tensor":
    """Brightness, contrast, gamma and noise per sample; a neutral parameter leaves its sample untouched."""
    import torch

    dev, f32, r = out.device, torch.float32, hi - lo

    def column(name: str) -> "torch.Tensor":
        return torch.as_tensor([getattr(p, name) for p in params], device=dev, dtype=f32).view(-1, 1, 1, 1)

    bright, contrast, gamma, noise = column("brightness"), column("contrast"), column("gamma"), column("noise")
    if torch.any(bright != 0):
        out = out + bright * r
    if torch.any(contrast != 1):
        mean = out.mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64).to(f32)
        out = torch.where(contrast != 1, mean + contrast * (out - mean), out)
    if torch.any(gamma != 1):
        curved = lo + r * ((out - lo) / r).clamp(0.0, 1.0) ** gamma
        out = torch.where(gamma != 1, curved, out)
    if torch.any(noise != 0):
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        field = torch.randn(out.shape, generator=generator, device=gen_dev, dtype=f32).to(dev)
        out = out + noise * r * field
    return out


def _check_maps(maps: "torch.Tensor", what: str, images: "torch.Tensor", out_size: int | None) -> None:
    """Refuse maps that are not ``(B, h, w)`` for the batch, or whose output crop does not fit the tiles."""
    b, _, h, w = images.shape
    if maps.ndim != 3 or maps.shape[0] != b:
        raise LabelError(f"{what} must be (B, h, w) with B = {b}, not of shape {tuple(maps.shape)}")
    oh, ow = (out_size, out_size) if out_size is not None else tuple(maps.shape[1:])
    if oh > h or ow > w or (h - oh) % 2 or (w - ow) % 2:
        raise ConfigError(f"output size {oh}x{ow} does not fit centred in {h}x{w} tiles")


def _sample_maps(grid: "torch.Tensor", maps: "torch.Tensor", out_size: int | None, how: str) -> "torch.Tensor":
    """The centred ``out_size`` crop (default: the maps' size) of ``(B, h, w)`` maps sampled on ``grid``
    (checked by :func:`_check_maps`)."""
    import torch
    import torch.nn.functional as F

    h, w = grid.shape[1:3]
    dev, f32 = grid.device, torch.float32
    mh, mw = maps.shape[1:]
    oh, ow = (out_size, out_size) if out_size is not None else (mh, mw)
    ky, kx = (h - oh) // 2, (w - ow) // 2
    sub = grid[:, ky:ky + oh, kx:kx + ow]
    if (mh, mw) != (h, w):   # re-normalise to the smaller map, centred on the tile
        pix = (sub + 1.0) / torch.tensor(_normaliser(h, w), device=dev, dtype=f32)
        pix = pix - torch.tensor([(w - mw) / 2.0, (h - mh) / 2.0], device=dev, dtype=f32)
        sub = pix * torch.tensor(_normaliser(mh, mw), device=dev, dtype=f32) - 1.0
    return F.grid_sample(maps.to(f32)[:, None], sub, mode=how, padding_mode="reflection",
                         align_corners=True)[:, 0]


def augment_batch_torch(images: "torch.Tensor", targets: "torch.Tensor | None",
                        weights: "torch.Tensor | None", cfg: AugmentConfig, generator: "torch.Generator",
                        out_size: int, *, value_range: tuple[float, float] = (0.0, 1.0),
                        ) -> tuple["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None"]:
    """Augment a batch of tiles on their device with ``grid_sample``: the torch twin of augment_tile.

    ``images`` ``(B, C, S, S)`` are input tiles; ``targets`` (integer) and ``weights`` (float) ``(B, s,
    s)`` are centred on them, best ``s = S``. One AugmentParams per sample is drawn from ``generator``
    (then the noise field), applied about each tile's centre with mirroring at the tile's edges, and
    the returned targets and weights are the centred ``(out_size, out_size)`` crops. Returns
    ``(images (B, C, S, S) float32, targets (B, out_size, out_size) or None, weights ... or None)``.
    """
    params = [sample_params(generator, cfg) for _ in range(images.shape[0])]
    return apply_params_torch(params, images, targets, weights, out_size=out_size, order=cfg.order,
                              value_range=value_range, generator=generator)
