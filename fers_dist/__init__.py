"""fers-dist: FERSNet (Zhao et al., ICPR 2020) reproduction, ablation and tuning at cluster scale."""

__version__ = "0.1.0"
