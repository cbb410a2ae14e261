"""User-facing errors. The CLI prints their message as one line and exits 2 (no traceback)."""


class FersError(Exception):
    """Bad input a user can fix: the message names the file or field and what was expected."""


class DataError(FersError, ValueError):
    """A dataset folder, image, label or Parquet file that cannot be used."""
