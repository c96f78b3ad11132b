"""Data augmentation shared by ``unet augment`` and training: elastic deformation, rigid changes, gray values.

One random draw, :class:`AugmentParams`, describes one augmentation completely. It is applied in this
fixed order (the order of :data:`ORDER`):

geometry, composed into one mapping and one resampling of the image
    1. ``shift``      the window moves by up to ``max_shift`` px along each axis;
    2. ``flip``       one of the 8 flips and 90-degree turns (the dihedral group, identity included);
    3. ``rotate``     a rotation by an angle uniform in [-max_angle, max_angle] degrees (positive turns the
                      content counter-clockwise on screen), about the window centre;
    4. ``scale``      a zoom by a factor log-uniform in ``scale_range`` (> 1 enlarges), about the centre;
    5. ``elastic``    the paper's deformation: displacement vectors on a coarse ``grid`` x ``grid`` grid
                      spanning the output window, drawn from a Gaussian with ``sigma`` px standard
                      deviation, turned into per-pixel displacements by bicubic interpolation (a cubic
                      spline through the grid values, applied separably along rows and columns).
                      Displacements are measured in output pixels.
gray values, applied to the resampled image only
    6. ``brightness`` adds a value uniform in [-max_brightness, max_brightness] x (value range);
    7. ``contrast``   scales about the window's mean by a factor log-uniform in ``contrast_range``;
    8. ``gamma``      ``lo + r * ((x - lo) / r) ** gamma`` (values clipped to the range first), gamma
                      log-uniform in ``gamma_range``;
    9. ``noise``      adds Gaussian noise with a standard deviation uniform in [0, max_noise] x (range).

Concretely, output pixel ``o`` (row, column) of a window whose pixel (0, 0) lies at source position
``origin`` takes its value from source position ``origin + c + t + M (o - c + d(o))``, with ``c`` the
window centre, ``t`` the shift, ``M = D^-1 R^-1 / s`` (flip or turn D, rotation R, scale s) and ``d`` the
elastic displacement field. The image is sampled with bicubic (``order=3``: cubic convolution with
a = -0.75, the kernel of torch's ``grid_sample`` and of OpenCV) or bilinear (``order=1``) interpolation,
label maps with nearest neighbour (so no label value appears that was not there before), weight maps
bilinearly. Outside the source the image is mirrored at its edge pixels (whole-sample symmetric:
``d c b | a b c d | c b a``), as in overlap-tile prediction. Only the output pixels are computed: the
cost follows the size of the output, not of the source image.

Two implementations sit behind one interface: numpy (:func:`augment_tile`, :func:`augment_sample`,
:func:`apply_params`) for the command and for data loading on the CPU, and torch ``grid_sample``
(:func:`augment_batch_torch`, :func:`apply_params_torch`) so that training on a GPU can augment on the
GPU. Both compute the same sampling positions from the same :class:`AugmentParams` and use the same
kernels, so they agree to float32 rounding (and on labels up to exact rounding ties).

This module is the public home of augmentation and holds the numpy interface and the gray values;
the parts live beside it and are re-exported here: the configuration and its random draw in
:mod:`unetcli.augparams`, the source positions and the sampling kernels in :mod:`unetcli.resample`,
the torch path in :mod:`unetcli.torchaugment`, and the preview pictures in :mod:`unetcli.previews`.

Randomness comes only from the generator passed in (``numpy.random.Generator`` or ``torch.Generator``);
the same seed gives the same result. Draws happen in the order of :data:`ORDER`, skipping switched-off
steps, then the noise field. Gray-value magnitudes are fractions of ``value_range`` (default 0 to 1).
"""

from __future__ import annotations

import numpy as np

from unetcli.augparams import ORDER, AugmentConfig, AugmentParams, check_range, sample_params
from unetcli.errors import ConfigError, ImageShapeError, LabelError
from unetcli.previews import contact_sheet, label_contours, preview_panel
from unetcli.resample import (KEYS_A, elastic_field, jacobian_determinant, sample_cubic, sample_linear,
                              sample_nearest, source_coordinates)
from unetcli.tiling import mirror_index
from unetcli.torchaugment import apply_params_torch, augment_batch_torch

__all__ = ["ORDER", "AugmentConfig", "AugmentParams", "sample_params", "KEYS_A", "elastic_field",
           "jacobian_determinant", "source_coordinates", "sample_nearest", "sample_linear", "sample_cubic",
           "mirror_index", "gray_values", "apply_params", "augment_sample", "augment_tile", "random_center",
           "apply_params_torch", "augment_batch_torch", "label_contours", "preview_panel", "contact_sheet"]


# ----------------------------------------------------------------------------------------- gray values

def gray_values(image: np.ndarray, params: AugmentParams, rng: np.random.Generator | None,
                value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Brightness, contrast, gamma and noise (steps 6 to 9) on a float32 image; the identity skips all.

    ``rng`` draws the noise field; it may be None when ``params.noise`` is 0.
    """
    lo, hi = check_range(value_range)
    r = hi - lo
    x = image.astype(np.float32, copy=True)
    if params.brightness != 0.0:
        x += np.float32(params.brightness * r)
    if params.contrast != 1.0:
        mean = np.float32(x.mean(dtype=np.float64))
        x = mean + np.float32(params.contrast) * (x - mean)
    if params.gamma != 1.0:
        x = lo + r * np.clip((x - lo) / r, 0.0, 1.0) ** np.float32(params.gamma)
    if params.noise != 0.0:
        if rng is None:
            raise ConfigError("noise needs a random generator")
        x += np.float32(params.noise * r) * rng.standard_normal(x.shape, dtype=np.float32)
    return x.astype(np.float32, copy=False)

# -------------------------------------------------------------------------------------- numpy interface

def _check_inputs(image: np.ndarray, target: np.ndarray | None, weights: np.ndarray | None) -> None:
    if image.ndim != 3:
        raise ImageShapeError(f"image must be (H, W, C), not of shape {image.shape}")
    h, w = image.shape[:2]
    if target is not None and target.shape != (h, w):
        raise LabelError(f"labels are {'x'.join(map(str, target.shape))}, the image is {h}x{w}",
                         hint="give labels of the image's height and width, one channel")
    if weights is not None and weights.shape != (h, w):
        raise LabelError(f"weights are {'x'.join(map(str, weights.shape))}, the image is {h}x{w}",
                         hint="give a weight map of the image's height and width, one channel")


def apply_params(rng: np.random.Generator | None, params: AugmentParams, image: np.ndarray,
                 target: np.ndarray | None = None, weights: np.ndarray | None = None, *,
                 out_shape: tuple[int, int] | None = None, origin: tuple[float, float] = (0.0, 0.0),
                 label_crop: int = 0, order: int = 3, value_range: tuple[float, float] = (0.0, 1.0),
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply one augmentation with the numpy path.

    ``image`` is ``(H, W, C)``; ``target`` and ``weights`` ``(H, W)`` on the same pixels. The output
    window is ``out_shape`` (default: the image's) with pixel (0, 0) at source position ``origin``.
    Labels and weights come back for the window less ``label_crop`` pixels on every side. ``rng`` draws
    the noise field (None when ``params.noise`` is 0).
    """
    _check_inputs(image, target, weights)
    out_shape = tuple(out_shape or image.shape[:2])
    ys, xs = source_coordinates(params, out_shape, origin)
    sample = sample_cubic if order == 3 else sample_linear
    out = gray_values(sample(image, ys, xs), params, rng, value_range)
    k = label_crop
    if k:
        ys, xs = ys[k:out_shape[0] - k, k:out_shape[1] - k], xs[k:out_shape[0] - k, k:out_shape[1] - k]
    tgt = sample_nearest(target, ys, xs) if target is not None else None
    wts = sample_linear(weights, ys, xs) if weights is not None else None
    return out, tgt, wts


def augment_sample(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray,
                   target: np.ndarray | None = None, weights: np.ndarray | None = None, *,
                   value_range: tuple[float, float] = (0.0, 1.0),
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One augmented copy of a whole image (``(H, W, C)``) with its labels and weights, same size.

    The transforms act about the image centre; where they reach outside, the image is mirrored.
    Returns ``(image float32 (H, W, C), target (H, W) of target's dtype or None, weights float32 or None)``.
    """
    params = sample_params(rng, cfg)
    return apply_params(rng, params, image, target, weights, order=cfg.order, value_range=value_range)


def augment_tile(rng: np.random.Generator, cfg: AugmentConfig, image: np.ndarray,
                 target: np.ndarray | None, weights: np.ndarray | None, in_size: int, out_size: int,
                 center: tuple[int, int] | None = None, *, value_range: tuple[float, float] = (0.0, 1.0),
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One augmented training tile: the network's input and the centred labels and weights it predicts.

    ``image`` is ``(H, W, C)`` float32, ``target`` ``(H, W)`` integer labels, ``weights`` ``(H, W)``
    float32 (either may be None). The tile is ``in_size`` square with its pixel ``(in_size // 2,
    in_size // 2)`` at source pixel ``center`` (rows, columns) before augmentation; when ``center`` is
    None it is drawn so that the ``out_size`` crop lies inside the image where it fits (centred where it
    does not). Then one random augmentation of ``cfg`` is drawn and applied, sampling only the tile's
    pixels (the image is never deformed as a whole); outside the image it is mirrored. Returns the
    input tile ``(in_size, in_size, C)`` float32 and the centred ``(out_size, out_size)`` crops of the
    deformed target (nearest neighbour, its dtype) and weights (linear, float32), as the valid-padding
    U-Net maps in_size to out_size. ``value_range`` is the range gray-value magnitudes refer to.

    Draws, in this order: the centre (if None), the AugmentParams, the noise field.
    """
    in_size, out_size = int(in_size), int(out_size)
    if out_size < 1 or in_size < out_size or (in_size - out_size) % 2:
        raise ConfigError(f"tile sizes must satisfy in_size >= out_size >= 1 with an even difference, "
                          f"not {in_size} and {out_size}")
    _check_inputs(image, target, weights)
    h, w = image.shape[:2]
    crop = (in_size - out_size) // 2
    if center is None:
        center = tuple(random_center(rng, n, in_size, out_size) for n in (h, w))
    origin = (float(center[0] - in_size // 2), float(center[1] - in_size // 2))
    params = sample_params(rng, cfg)
    return apply_params(rng, params, image, target, weights, out_shape=(in_size, in_size),
                        origin=origin, label_crop=crop, order=cfg.order, value_range=value_range)


def random_center(rng: np.random.Generator, n: int, in_size: int, out_size: int) -> int:
    """A tile centre along an axis of length n for which the output crop lies inside, where it fits.

    The centre is the source pixel under the tile's pixel ``in_size // 2``, as ``augment_tile`` takes
    it; uniform over the allowed positions, or the middle when the axis is shorter than ``out_size``.
    """
    offset = in_size // 2 - (in_size - out_size) // 2    # centre minus the output crop's first pixel
    if n < out_size:
        return (n - out_size) // 2 + offset
    return int(rng.integers(offset, n - out_size + offset + 1))
