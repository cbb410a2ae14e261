"""Data: layout readers for CK+, Oulu-CASIA, MMI and BU-4DFE (``layouts``), procedural synthetic faces
in those layouts (``synthetic``), face aligners (``align``), identity-independent folds (``folds``),
the Ray Data prepare pipeline to one Parquet file per dataset (``prepare``), and the Parquet loader
(``loader``). Everything here except ``prepare`` is Ray-free."""
