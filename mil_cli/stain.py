"""Stain normalisation of patch batches on the device (`milcli embed --stain`).

H&E colour differs between labs and scanners; an encoder sees those differences as features.
Both methods map each patch's colours onto a target's, in torch, on whole (B, 3, H, W) float
batches in 0-255, where the patches already are for the encoder:
- reinhard (Reinhard et al. 2001): each patch's per-channel mean and standard deviation in
  CIELAB, over its tissue pixels (glass would weigh in by how much of it a patch holds), are
  matched to the target's; glass stays as it is.
- macenko (Macenko et al. 2009): in optical density (OD = -log(I / I0)), a patch's stain
  vectors are the extreme angles (1st and 99th percentiles) of its tissue pixels projected on
  the plane of the two largest eigenvectors of their OD covariance; the pixels' stain
  concentrations (least squares on those vectors) are scaled so their 99th percentile matches
  the target's, and recombined with the target's stain vectors.
Patches with too little tissue for the estimate (under MIN_TISSUE_SHARE of their pixels)
pass unchanged. The target is a bundled H&E reference (statistics measured with
this code on a crop of the CC0 CMU-1 slide; `stain_target` recomputes them from any image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil_cli.errors import InputError

METHODS = ("none", "reinhard", "macenko")
OD_TISSUE = 0.15         # OD in every channel above which a pixel counts as stained (Macenko's beta)
ANGLE_PERCENTILE = 0.01  # Macenko's alpha: robust extremes of the stain angles
MAX_PERCENTILE = 0.99    # robust maximum of a stain's concentration
MIN_TISSUE_SHARE = 0.05  # Macenko needs this share of stained pixels to estimate a patch's stains


@dataclass(frozen=True)
class StainTarget:
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    stains: tuple[tuple[float, float, float], tuple[float, float, float]]  # haematoxylin, eosin OD unit vectors
    max_concentration: tuple[float, float]


# measured by stain_target() on BUNDLED_REGION (level-0 x, y, size) of tests/data/CMU-1-Small-Region.svs
BUNDLED_REGION = (700, 1200, 512)
BUNDLED_TARGET = StainTarget(lab_mean=(48.5, 29.5, -12.8), lab_std=(19.9, 11.2, 10.5),
                             stains=((0.693, 0.645, 0.323), (0.19, 0.92, 0.343)),
                             max_concentration=(4.42, 3.35))


def _linear(srgb: torch.Tensor) -> torch.Tensor:
    return torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _gamma(linear: torch.Tensor) -> torch.Tensor:
    linear = linear.clamp(0, 1)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)


_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])  # D65


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0-255 -> CIELAB (D65), as skimage.color.rgb2lab."""
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(x), _linear(x / 255)) / _WHITE.to(x).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab), xyz)
    return _gamma(linear) * 255


def optical_density(x: torch.Tensor) -> torch.Tensor:
    return -torch.log((x + 1) / 256)  # +1: no log of 0; I0 = 255 (+1)


def from_optical_density(od: torch.Tensor) -> torch.Tensor:
    return (256 * torch.exp(-od) - 1).clamp(0, 255)


GLASS_L = 88.0  # CIELAB lightness above which a pixel is glass: left out of Reinhard's statistics and left as it is


def _tissue_moments(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of each CIELAB channel over the tissue (non-glass) pixels, and
    the tissue mask (B, 1, H, W)."""
    tissue = (lab[:, :1] < GLASS_L).to(lab.dtype)
    count = tissue.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    mean = (lab * tissue).sum(dim=(2, 3), keepdim=True) / count
    std = ((lab - mean).square() * tissue).sum(dim=(2, 3), keepdim=True).div(count).sqrt()
    return mean, std, tissue


def reinhard(x: torch.Tensor, target: StainTarget) -> torch.Tensor:
    lab = rgb_to_lab(x)
    mean, std, tissue = _tissue_moments(lab)
    goal_mean = torch.tensor(target.lab_mean).to(x).view(1, 3, 1, 1)
    goal_std = torch.tensor(target.lab_std).to(x).view(1, 3, 1, 1)
    matched = lab_to_rgb((lab - mean) / std.clamp(min=1e-3) * goal_std + goal_mean).clamp(0, 255)
    enough = tissue.mean(dim=(1, 2, 3), keepdim=True) >= MIN_TISSUE_SHARE
    return torch.where((tissue > 0) & enough, matched, x)


def macenko_stains(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, P) OD -> (B, 3, 2) stain unit vectors (haematoxylin first) and (B,) whether the
    patch had enough stained pixels to estimate them."""
    tissue = (od > OD_TISSUE).all(dim=1)                                   # (B, P)
    count = tissue.sum(dim=1)
    weights = tissue.to(od.dtype) / count.clamp(min=1).unsqueeze(1)
    mean = (od * weights.unsqueeze(1)).sum(dim=2, keepdim=True)
    centred = (od - mean) * tissue.unsqueeze(1)
    covariance = centred @ centred.transpose(1, 2) / count.clamp(min=2).view(-1, 1, 1)
    _, vectors = torch.linalg.eigh(covariance)                              # ascending eigenvalues
    plane = vectors[:, :, 1:].flip(-1)                                      # (B, 3, 2), largest first
    plane = plane * torch.where(plane[:, :1] < 0, -1.0, 1.0)               # point into positive OD
    projected = plane.transpose(1, 2) @ od                                  # (B, 2, P)
    angle = torch.atan2(projected[:, 1], projected[:, 0]).masked_fill(~tissue, float("nan"))
    low = torch.nanquantile(angle, ANGLE_PERCENTILE, dim=1)
    high = torch.nanquantile(angle, 1 - ANGLE_PERCENTILE, dim=1)

    def direction(theta: torch.Tensor) -> torch.Tensor:
        return plane[:, :, 0] * torch.cos(theta).unsqueeze(1) + plane[:, :, 1] * torch.sin(theta).unsqueeze(1)

    first, second = direction(low), direction(high)
    haematoxylin_first = (first[:, 0] > second[:, 0]).unsqueeze(1)         # haematoxylin absorbs more red
    stains = torch.stack([torch.where(haematoxylin_first, first, second),
                          torch.where(haematoxylin_first, second, first)], dim=2)
    stains = stains / stains.norm(dim=1, keepdim=True).clamp(min=1e-6)
    enough = (count >= MIN_TISSUE_SHARE * od.shape[2]) & stains.isfinite().all(dim=(1, 2))
    return torch.where(enough.view(-1, 1, 1), stains, torch.eye(3, 2).to(stains)), enough


def concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """(B, 2, P) least-squares stain concentrations."""
    return torch.linalg.pinv(stains) @ od


def peak_concentrations(od: torch.Tensor, amounts: torch.Tensor) -> torch.Tensor:
    """(B, 2) robust maximum of each stain's concentration over the stained pixels."""
    tissue = (od > OD_TISSUE).all(dim=1, keepdim=True).expand_as(amounts)
    return torch.nanquantile(amounts.masked_fill(~tissue, float("nan")), MAX_PERCENTILE, dim=2)


def macenko(x: torch.Tensor, target: StainTarget) -> torch.Tensor:
    b, _, h, w = x.shape
    od = optical_density(x).flatten(2)
    stains, enough = macenko_stains(od)
    amounts = concentrations(od, stains)
    peak = peak_concentrations(od, amounts)
    scale = torch.tensor(target.max_concentration).to(x) / peak.clamp(min=1e-3)
    goal = torch.tensor(target.stains).to(x).T                             # (3, 2)
    normalised = from_optical_density(goal @ (amounts * scale.unsqueeze(2))).view(b, 3, h, w)
    return torch.where(enough.view(b, 1, 1, 1), normalised, x)


def normalise(x: torch.Tensor, method: str, target: StainTarget = BUNDLED_TARGET) -> torch.Tensor:
    """(B, 3, H, W) float 0-255 -> the same, stain-normalised by `method`."""
    if method == "reinhard":
        return reinhard(x, target)
    if method == "macenko":
        return macenko(x, target)
    return x


def stain_target(image: np.ndarray) -> StainTarget:
    """A target's statistics from an (H, W, 3) uint8 H&E image."""
    x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).unsqueeze(0).double()
    lab = rgb_to_lab(x)
    lab_mean, lab_std, _ = _tissue_moments(lab)
    od = optical_density(x).flatten(2)
    stains, enough = macenko_stains(od)
    if not bool(enough[0]):
        raise ValueError("too little stained tissue to measure its stains")
    peak = peak_concentrations(od, concentrations(od, stains))[0]

    def rounded(values: torch.Tensor, digits: int) -> tuple:
        return tuple(round(float(v), digits) for v in values)

    return StainTarget(lab_mean=rounded(lab_mean.flatten(), 1), lab_std=rounded(lab_std.flatten(), 1),
                       stains=(rounded(stains[0, :, 0], 3), rounded(stains[0, :, 1], 3)),
                       max_concentration=rounded(peak, 2))


def load_target(path: Path) -> StainTarget:
    """`--stain-target IMAGE`: its statistics, or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(path, f"not a readable image ({exc})") from None
    try:
        return stain_target(pixels)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
