"""Job entry point for the cross-validation protocol: the same code as `fers cv`.

Runs unchanged locally (python jobs/run_cv.py --config jobs/configs/demo.yaml ...) and as a submitted
Ray job (fers submit -- python jobs/run_cv.py --config jobs/configs/paper.yaml --storage s3://...).
"""

import sys

from fers_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["cv", *sys.argv[1:]]))
