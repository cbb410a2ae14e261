"""Results of an experiment for people to read: ``fers report`` (tables, figures, report.html) and
``fers fes-eval`` (the paper's Table V protocol). Reads Parquet and checkpoints; never imports Ray."""
