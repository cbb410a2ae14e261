"""The λ study on Ray Tune + Optuna: loss weights and LR schedule searched on inner folds carved from the
training subjects of an outer fold, with ASHA, resumable Optuna storage, and the best config as YAML.

- ``cli``: ``fers tune`` and :func:`run_tune`; ``searcher``: the OptunaSearch/ASHA glue and the trial;
- ``objective``: nested CV inside one trial (plain PyTorch); ``search_space``: the space and its checks;
- ``study``: Optuna storage and study bookkeeping; ``outputs``: trials table and plots;
- ``bench``: ``fers bench tune``.

Imports ``cv`` (resources, and ``run_cv`` for ``--evaluate-best``) and everything below it, never
``report`` or ``demo``. With ``data/prepare.py``, ``cv/`` and ``submit.py``, this is where Ray lives.
"""
