"""FES-DA (paper Table VI, "w/ FES-DA"): after the original model trains, synthesise every expression
for every training image so the classes balance, then fine-tune the recogniser on real plus synthetic
faces. The test fold is never touched."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fers_dist.data.loader import FaceSet, center_crop
from fers_dist.train.speed import autocast


@torch.no_grad()
def synthesize_balanced(model: torch.nn.Module, train: FaceSet, crop: int, amp: bool = False,
                        batch_size: int = 256) -> FaceSet:
    """Each training face stands for its own class; G(z^t, I) supplies the other E-1 classes.

    Every class therefore gets exactly ``len(train)`` faces. Synthesised crops are pasted into the centre
    of the source's aligned face, so the paper's crop/rotation augmentation applies to them unchanged.
    """
    was_training = model.training
    model.eval()
    size, E, device = train.images.shape[-1], train.num_classes, train.images.device
    o = (size - crop) // 2
    parts = [train]
    for c in range(E):
        idx = (train.labels != c).nonzero().squeeze(1)
        images = train.images[idx].clone()
        for start in range(0, idx.numel(), batch_size):
            src = images[start:start + batch_size]
            onehot = F.one_hot(torch.full((src.shape[0],), c, device=device), E).float()
            with autocast(device, amp):
                fake = model(center_crop(src, crop), onehot).image.float()
            src[..., o:o + crop, o:o + crop] = ((fake + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        synth = train.subset(idx)
        parts.append(FaceSet(images=images, labels=torch.full_like(synth.labels, c), subjects=synth.subjects,
                             folds=synth.folds, class_names=train.class_names,
                             subject_names=train.subject_names, dataset=train.dataset))
    model.train(was_training)
    first = parts[0]
    return FaceSet(
        images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts]),
        subjects=torch.cat([p.subjects for p in parts]), folds=torch.cat([p.folds for p in parts]),
        class_names=first.class_names, subject_names=first.subject_names, dataset=first.dataset,
    )
