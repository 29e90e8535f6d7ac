"""Listing and opening shard files on local disks, file://, s3://, gs:// (pyarrow) and hf:// (fsspec)."""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath

PYARROW_SCHEMES = ("file://", "s3://", "gs://", "gcs://", "hdfs://", "viewfs://")


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _split_scheme(path: str) -> tuple[str, str]:
    scheme, sep, rest = path.partition("://")
    return (scheme + sep, rest) if sep else ("", path)


def list_files(path: str) -> list[str]:
    """Files in a folder, or matching a glob in its last component, sorted; raises if none."""
    scheme, _ = _split_scheme(path)
    if not scheme:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in os.listdir(path)]
        else:
            found = glob.glob(path)
        return sorted(os.path.abspath(p) for p in found if os.path.isfile(p))
    if scheme in PYARROW_SCHEMES:
        import pyarrow.fs as pafs

        folder, pattern = (posixpath.dirname(path), posixpath.basename(path)) if _is_glob(path) else (path, "*")
        fs, root = pafs.FileSystem.from_uri(folder)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
        names = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(posixpath.basename(i.path), pattern)]
        return sorted(folder.rstrip("/") + "/" + posixpath.basename(n) for n in names)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    found = fs.glob(root) if _is_glob(root) else [p for p in fs.ls(root, detail=False) if fs.isfile(p)]
    return sorted(f"{scheme}{p}" for p in found)


def open_binary(path: str):
    """A binary stream of the file's bytes (gzip is left to the caller)."""
    scheme, _ = _split_scheme(path)
    if not scheme:
        return open(path, "rb")
    if scheme in PYARROW_SCHEMES:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(path)
        return fs.open_input_file(root)
    import fsspec

    return fsspec.open(path, "rb").open()
