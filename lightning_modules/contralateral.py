"""Bilateral asymmetry: a patch's calibrated score against the same place in the woman's other breast (plain torch).

A radiologist reads a mammogram beside the other breast's: tissue that is dense, bright or unusual in both
breasts at mirrored places is the woman's anatomy (the pectoral muscle in the top corner of an MLO view, a dense
glandular cone, the nipple region); a lesion is usually in one breast only. The healthy-tissue density cannot know
that: it ranks every unusual patch as unlikely. Here the other breast's calibrated map is mirrored onto this one
(`register_mirrored`: the shift that best overlaps the two breast masks, searched on a coarse grid), and each grid
score loses the other breast's score around the same place (`contralateral_reference`: the mean or the maximum
of its grid scores within ``radius_px``, which absorbs what the mask registration cannot align). The difference is
calibrated again on healthy women's pairs (`AnomalyDetector.score_item`), so it is a p-value like the one-sided
score; an image without a pair keeps its one-sided score. The references are centred on their median over the
image, so the other breast removes local structure both breasts share, not the breast's overall level.
"""

from __future__ import annotations

import torch
from torch import Tensor

REFERENCES = ("mean", "max")
#: the values of the ``contralateral`` option (`RatSpnStage`, ``mammospn table1 --contralateral``): "none" = one-sided
OPTIONS = ("none", *REFERENCES)


def register_mirrored(mask: Tensor, other: Tensor, step: int = 8, max_shift: float = 0.25) -> tuple[int, int]:
    """The shift (rows, columns in px) that moves the mirrored ``other`` breast mask (left-right flipped) onto
    ``mask`` with the largest overlap, searched every ``step`` px up to ``max_shift`` of ``mask``'s size.

    Row r, column c of the mirrored mask lands at (r + dy, c + dx); the masks may differ in size.
    """
    a = torch.as_tensor(mask).bool()[::step, ::step].double()
    b = torch.as_tensor(other).bool().flip(-1)[::step, ::step].double()
    if not bool(a.any()) or not bool(b.any()):
        return 0, 0
    rows, cols = a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1
    # the full cross-correlation (overlap of a with b moved by every shift), by FFT
    spectrum = torch.fft.rfft2(a, (rows, cols)) * torch.fft.rfft2(b.flip(0, 1), (rows, cols))
    corr = torch.fft.irfft2(spectrum, (rows, cols))
    lim_r, lim_c = int(a.shape[0] * max_shift), int(a.shape[1] * max_shift)
    zero_r, zero_c = b.shape[0] - 1, b.shape[1] - 1  # the index of shift 0
    window = corr[max(zero_r - lim_r, 0):zero_r + lim_r + 1, max(zero_c - lim_c, 0):zero_c + lim_c + 1]
    row, col = divmod(int(torch.argmax(window)), window.shape[1])
    return (row + max(zero_r - lim_r, 0) - zero_r) * step, (col + max(zero_c - lim_c, 0) - zero_c) * step


def contralateral_reference(scores: Tensor, centers: Tensor, other_scores: Tensor, other_centers: Tensor,
                            other_width: int, shift: tuple[int, int], radius_px: float,
                            reference: str = "mean", centre: bool = True, chunk: int = 4096) -> Tensor:
    """The other breast's score around each grid centre of this one (float32, one per ``centers`` row).

    ``other_centers`` (row, column px in an image ``other_width`` wide) are mirrored left-right and moved by
    ``shift`` (`register_mirrored`); a centre's reference is the ``reference`` ("mean" or "max") of the other
    breast's ``other_scores`` at the centres within ``radius_px`` (a square window: rows and columns each within
    it), or the median of ``other_scores`` where none lies that close (tissue the other breast has no match for).
    ``centre`` (default) subtracts the median of those references over this image's grid: the reference then says
    where the other breast is unusual, not how unusual it is overall. Uncentred, a woman whose other breast scores
    high everywhere (dense on both sides) shifted all of this breast's scores down, an image-level shift that cost
    the pooled pixel AUC on mini-MIAS lesion validation (README "Bilateral asymmetry").
    """
    if reference not in REFERENCES:
        raise ValueError(f"contralateral reference must be one of {REFERENCES}, got {reference!r}")
    if radius_px < 0:
        raise ValueError(f"contralateral radius must be >= 0 px, got {radius_px:g}")
    here = torch.as_tensor(centers).reshape(-1, 2).to(torch.float64)
    there = torch.as_tensor(other_centers).reshape(-1, 2).to(torch.float64)
    values = other_scores.detach().reshape(-1).to(torch.float64).cpu()
    if there.shape[0] != values.numel():
        raise ValueError(f"{values.numel()} contralateral scores for {there.shape[0]} grid centres")
    if values.numel() == 0:
        return torch.zeros(here.shape[0], dtype=torch.float32)
    mirrored = torch.stack([there[:, 0] + shift[0], (int(other_width) - 1 - there[:, 1]) + shift[1]], dim=1)
    fill = values.median()
    out = torch.empty(here.shape[0], dtype=torch.float64)
    for start in range(0, here.shape[0], chunk):
        part = here[start:start + chunk]
        near = ((part[:, None, :] - mirrored[None, :, :]).abs() <= radius_px).all(-1)  # chunk x M_other
        count = near.sum(1)
        if reference == "mean":
            ref = (near.double() @ values) / count.clamp(min=1)
        else:
            ref = torch.where(near, values[None, :], torch.tensor(-torch.inf, dtype=torch.float64)).max(1).values
        out[start:start + chunk] = torch.where(count > 0, ref, fill)
    if centre and out.numel():
        out = out - out.median()
    return out.float()


__all__ = ["OPTIONS", "REFERENCES", "contralateral_reference", "register_mirrored"]
