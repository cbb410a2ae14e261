"""User-facing errors. The CLI prints their message as one line and exits 2 (no traceback)."""


class FersError(Exception):
    """Bad input a user can fix: the message names the file or field and what was expected."""


class DataError(FersError, ValueError):
    """A dataset folder, image, label or Parquet file that cannot be used."""


_FAULT_TYPES = ("OutOfMemoryError", "AcceleratorError", "DistBackendError", "DistNetworkError")
_FAULT_WORDS = ("CUDA", "cuDNN", "CUBLAS", "NCCL", "out of memory", "device-side assert")


def is_infrastructure_fault(e: BaseException) -> bool:
    """A fault of the machine, never of the data (CUDA error, out of memory, a broken collective): it
    must fail the run with its message, not be counted as a bad image or a rejected face."""
    if isinstance(e, MemoryError) or type(e).__name__ in _FAULT_TYPES:
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in _FAULT_WORDS)
