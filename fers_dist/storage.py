"""Where results and checkpoints live: a local (or NFS) path, or any pyarrow filesystem URI (``s3://``,
``gs://``, ``hdfs://``). S3-compatible stores (MinIO, Ceph, a test's moto server) are reached through
the standard ``AWS_ENDPOINT_URL`` variable (set on every node; a query string on the URI would not
survive the paths fers-dist appends to it).
Ray-free; the commands, the Ray layer and the report all move files through here.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from fers_dist.errors import FersError


def is_uri(path: str) -> bool:
    """s3://, gs://, hdfs://… (``file://`` is a local path)."""
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        raise FersError(f"storage {uri!r}: cannot open ({e})") from None


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def download(uri: str, local: str | Path | None = None) -> Path:
    """Copy one file to ``local`` (default: a new temporary folder, same file name)."""
    fs, path = filesystem(uri)
    local = Path(local) if local else Path(tempfile.mkdtemp(prefix="fers-")) / Path(path).name
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f"{local.name}.{uuid.uuid4().hex}.part")
    try:
        with fs.open_input_stream(path) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    except FileNotFoundError:
        part.unlink(missing_ok=True)
        raise FersError(f"{uri}: not found") from None
    part.replace(local)
    return local


def upload(local: str | Path, uri: str) -> str:
    """Copy one file to ``uri``, replacing what is there. On object stores the new object appears only
    when its upload completes, so a reader sees the old file or the new one, never half of it."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    return uri


def list_files(uri: str) -> list[str]:
    """Every file under ``uri`` (recursively), as paths inside its filesystem."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not exists(uri):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)
