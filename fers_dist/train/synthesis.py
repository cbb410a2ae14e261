"""Every target expression synthesised for a set of faces, as uint8 pixels (the Table V protocol, the
report's Fig. 4 grid and the λ study's FES objective all read synthesis through here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, as an image file would store them."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def synthesise_all(model: torch.nn.Module, images: torch.Tensor, crop: int, E: int,
                   batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """G(z^t, I) for every target expression t of every face: uint8 [N, C, S, S] -> uint8 [N, E, C, crop, crop]
    (centre crop in, as at test time; bf16 autocast when ``amp``)."""
    from fers_dist.data.loader import center_crop
    from fers_dist.train.speed import autocast

    model.eval()
    device = next(model.parameters()).device
    n, c = images.shape[:2]
    out = torch.empty((n, E, c, crop, crop), dtype=torch.uint8)
    step = max(1, batch_size // E)
    for start in range(0, n, step):
        x = center_crop(images[start:start + step].to(device), crop)
        b = x.shape[0]
        targets = torch.arange(E, device=device).repeat(b)
        with autocast(device, amp):
            fake = model(x.repeat_interleave(E, 0), F.one_hot(targets, E).float()).image
        out[start:start + b] = to_uint8(fake).view(b, E, c, crop, crop).cpu()
    return out


def centre_uint8(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The uint8 centre crop the network sees at test time."""
    o = (images.shape[-1] - crop) // 2
    return images[..., o:o + crop, o:o + crop]
