"""Layout readers: one module per dataset, each turning a folder exactly as distributed into
``FaceRecord``s (``read(root, **opts) -> ReadResult``). ``DATASETS`` is the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fers_dist.data.layouts import bu4dfe, ckplus, mmi, oulu
from fers_dist.data.layouts.base import FaceRecord, ReadResult, TableReport
from fers_dist.errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: tuple[str, ...]
    read: Callable[..., ReadResult]
    table1: dict  # the paper's Table I: sequences, images (and per-class sequences where known)


DATASETS: dict[str, DatasetSpec] = {
    m.NAME: DatasetSpec(m.NAME, m.CLASS_NAMES, m.read, m.TABLE1) for m in (ckplus, oulu, mmi, bu4dfe)
}


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"dataset: {name!r} is not one of {', '.join(DATASETS)}") from None


__all__ = ["DATASETS", "DatasetSpec", "FaceRecord", "ReadResult", "TableReport", "get_dataset"]
