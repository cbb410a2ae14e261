"""Results of an experiment for people to read: ``fers report`` (tables, figures, report.html) and
``fers fes-eval`` (runs ``train.fes_eval``, the paper's Table V protocol, over an experiment's
checkpoints). Reads Parquet and checkpoints; never imports Ray, ``cv`` or ``tune``."""
