"""The paper's published numbers (Zhao et al., ICPR 2020), for the side-by-side tables."""

from __future__ import annotations

DATASET_NAMES = {"ckplus": "CK+", "oulu": "Oulu-CASIA", "mmi": "MMI", "bu4dfe": "BU-4DFE"}
VARIANT_NAMES = {"no_mtl": "w/o MTL", "no_convflu": "w/o ConvFLU", "original": "original",
                 "fes_da": "w/ FES-DA"}
VARIANT_ORDER = ("no_mtl", "no_convflu", "original", "fes_da")  # Table VI column order

# Table VI: accuracy (%) trained from scratch, mean over the 10 identity-independent test folds.
TABLE_VI = {
    "ckplus": {"no_mtl": 94.70, "no_convflu": 95.21, "original": 97.35, "fes_da": 97.75},
    "oulu": {"no_mtl": 73.33, "no_convflu": 77.92, "original": 83.47, "fes_da": 87.64},
    "mmi": {"no_mtl": 63.78, "no_convflu": 69.07, "original": 71.31, "fes_da": 73.87},
}

# Accuracy (%) after pre-training on BU-4DFE (our runs carry tag "pretrained": results.PRETRAINED_TAG).
PRETRAINED_BU4DFE = {"ckplus": 97.85, "oulu": 89.23, "mmi": 75.32}

# Table V: a recogniser trained on real training images only, tested on FES-synthesised test images (%).
TABLE_V_FES = {"ckplus": 97.04, "oulu": 81.52}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def variant_name(variant: str) -> str:
    return VARIANT_NAMES.get(variant, variant)
