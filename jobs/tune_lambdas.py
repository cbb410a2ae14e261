"""Ray job entry point for ``fers tune`` (λ-weight and LR-schedule tuning with Ray Tune + Optuna).

    python jobs/tune_lambdas.py --config jobs/configs/tune.yaml --dataset oulu --trials 50 \
        --storage sqlite:///results/oulu-lambdas.db
    fers submit -- python jobs/tune_lambdas.py --config my-tune.yaml --storage postgresql://…

It runs exactly ``fers tune`` with the same flags, locally or as a submitted Ray job (inside a job it
connects to the job's cluster through RAY_ADDRESS). Re-running it with the same storage and study
resumes the study. ``python jobs/tune_lambdas.py --help`` lists the flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a shipped working dir needs no install

from fers_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
