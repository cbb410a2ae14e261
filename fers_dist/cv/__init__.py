"""The CV grid on Ray: datasets x variants x folds as fold runs, each a Ray Tune trial driving a Ray Train
run, packed onto the cluster's free CPUs/GPUs, resumable, one ``folds.parquet`` row per finished run.

- ``cli``: ``fers cv`` and :func:`run_cv` (the grid, its waves, resume by config hash);
- ``fold_run``: one fold run inside Ray (Tune trial -> Train workers -> ``train.fold.fit_fold``);
- ``resources``: Ray sessions, free resources and how runs are packed; ``plan``: ``--dry-run``;
- ``progress``: the live table and the row writer; ``bench``: ``fers bench cv``.

Imports ``data``, ``model``, ``train`` and the top-level helpers (config, results, io), never ``tune``,
``report`` or ``demo``. With ``data/prepare.py``, ``tune/`` and ``submit.py``, this is where Ray lives;
everything below runs in plain PyTorch.
"""
