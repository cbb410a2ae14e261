"""FERSNet model package: ConvFLU (eq. 1-4), FERSNet and its ablations, the conditional PatchGAN,
LightCNN-9 identity features and the losses (eq. 5-10).

Names are imported lazily so that importing this package (e.g. for ``fers bench --help``) does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConvFLU": "convflu",
    "FERSNet": "fersnet",
    "FERNet": "fersnet",
    "SharedTrunkNet": "fersnet",
    "FERSOutput": "fersnet",
    "Gates": "fersnet",
    "build_model": "fersnet",
    "conv_block": "fersnet",
    "count_params": "fersnet",
    "capacity": "fersnet",
    "architecture": "fersnet",
    "PatchDiscriminator": "discriminator",
    "LightCNN9": "lightcnn",
    "load_lightcnn9": "lightcnn",
    "to_lightcnn_input": "lightcnn",
    "cls_loss": "losses",
    "gan_loss": "losses",
    "rec_loss": "losses",
    "cyc_loss": "losses",
    "idt_loss": "losses",
    "total_loss": "losses",
    "lambda_idt": "losses",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
