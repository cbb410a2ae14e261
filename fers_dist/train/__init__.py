"""One fold in plain PyTorch (no Ray): the trainer for the paper's objective (eq. 5-10) and its ablations
(``trainer``, ``fold``), checkpoints, identity features, FES-DA, evaluation, and the Table V protocol
(``fes_eval``, with ``synthesis`` and ``identity_score``). Imports ``data`` and ``model``; ``cv/`` and
``tune/`` run it inside Ray."""
