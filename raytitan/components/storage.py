"""The one filesystem layer: a run's files and the data shards, on a local or shared folder, or
an object store (``s3://``, ``gs://``, ``hdfs://``) through pyarrow's filesystems; other URL
schemes (``hf://``) through fsspec, for reading data only.

Paths stay plain strings throughout raytitan: folder paths, or URIs for object stores. The
storage root may carry pyarrow's URI options (``s3://bucket/runs?endpoint_override=host:9000&
scheme=http`` for an S3-compatible store); ``use_root`` registers them once per process, so the
paths below the root need no query. Checkpoints go through DCP's file-system writer and reader
over these filesystems (``raytitan.components.checkpoint.dcp_files``): this module imports no
torch, so the data pipeline's processes that read shards through it do not load it.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
import posixpath
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Generator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

LOCAL = pafs.LocalFileSystem()
_OBJECT_STORES = ("s3", "gs", "gcs")  # URIs whose host part is the bucket, part of the path
_filesystems: dict[tuple[str, str], pafs.FileSystem] = {}
_mounted: dict[str, pafs.FileSystem] = {}  # URL scheme -> a filesystem of raytitan's own (memory snapshots)


def mount(scheme: str, filesystem: pafs.FileSystem | None) -> None:
    """Serve ``scheme://`` paths from ``filesystem`` in this process (None: stop serving them).
    Its paths are given to it as ``host/path``, like an object store's."""
    if filesystem is None:
        _mounted.pop(scheme, None)
    else:
        _mounted[scheme] = filesystem


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def use_root(root: str | None) -> None:
    """Register the filesystem (with its URI options) for an object-store storage root."""
    if root and is_remote(root):
        u = urlsplit(root)
        fs, _ = pafs.FileSystem.from_uri(root)
        _filesystems[(u.scheme, u.netloc)] = fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``path`` and the path within it."""
    if not is_remote(path):
        return LOCAL, os.path.abspath(path.removeprefix("file://"))
    u = urlsplit(path)
    if u.scheme in _mounted:
        return _mounted[u.scheme], (u.netloc + u.path).rstrip("/")
    key = (u.scheme, u.netloc)
    if key not in _filesystems:
        _filesystems[key] = pafs.FileSystem.from_uri(f"{u.scheme}://{u.netloc}{'?' + u.query if u.query else ''}")[0]
    inner = (u.netloc + u.path) if u.scheme in _OBJECT_STORES else u.path
    return _filesystems[key], inner.rstrip("/")


def join(path: str, *names: str) -> str:
    return posixpath.join(path, *names) if is_remote(path) else os.path.join(path, *names)


def _info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    """A file or a folder."""
    return _info(path).type != pafs.FileType.NotFound


def isfile(path: str) -> bool:
    return _info(path).type == pafs.FileType.File


def size(path: str) -> int:
    """Bytes in a file; -1 when there is none."""
    info = _info(path)
    return info.size if info.type == pafs.FileType.File else -1


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (empty if it does not exist)."""
    fs, inner = resolve(path)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))]


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def rmtree(path: str) -> None:
    fs, inner = resolve(path)
    try:
        fs.delete_dir(inner)
    except FileNotFoundError:
        pass


def remove(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def read_from(path: str, offset: int) -> bytes:
    """The bytes of ``path`` from ``offset`` on (a growing log followed by a reader)."""
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as f:
        f.seek(offset)
        return f.read()


def read_text(path: str) -> str:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def handler(path: str) -> tuple[object | None, str]:
    """The Python handler of a mounted filesystem serving ``path`` (None for any other), with the
    path within it: for what only that filesystem does (memory snapshots' parts and seals)."""
    fs, inner = resolve(path)
    return getattr(fs, "handler", None), inner


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def write_bytes(path: str, data) -> None:
    """Write a whole file (not atomically: for files a commit marker vouches for). A mounted
    filesystem whose handler has ``write_whole(path, data)`` takes the buffer as it is."""
    fs, inner = resolve(path)
    whole = getattr(getattr(fs, "handler", None), "write_whole", None)
    if whole is not None:
        whole(inner, data)
        return
    with fs.open_output_stream(inner) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Replace ``path`` atomically: readers see the old or the new content, never a part."""
    if not is_remote(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    fs, inner = resolve(path)
    with fs.open_output_stream(inner) as f:  # an object appears whole when its upload completes
        f.write(text.encode())


def append_text(path: str, text: str) -> None:
    """Add to the end of a small file (object stores rewrite it: keep such files small)."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_text(path) if isfile(path) else ""
    write_text(path, old + text)


# --------------------------------------------------------------------------- data shards


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _pyarrow_scheme(path: str) -> bool:
    return urlsplit(path).scheme in ("file", "hdfs", "viewfs", *_OBJECT_STORES)


def list_files(path: str) -> list[str]:
    """Files in a folder, or matching a glob in its last component, sorted."""
    if "://" not in path:
        path = os.path.expanduser(path)
        found = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else glob.glob(path)
        return sorted(os.path.abspath(p) for p in found if os.path.isfile(p))
    if _pyarrow_scheme(path):
        folder, pattern = (posixpath.dirname(path), posixpath.basename(path)) if _is_glob(path) else (path, "*")
        fs, inner = resolve(folder)
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
        return sorted(f"{folder.rstrip('/')}/{i.base_name}" for i in infos
                      if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))
    import fsspec

    scheme = path.split("://", 1)[0] + "://"
    fs, inner = fsspec.core.url_to_fs(path)
    found = fs.glob(inner) if _is_glob(inner) else [p for p in fs.ls(inner, detail=False) if fs.isfile(p)]
    return sorted(f"{scheme}{p}" for p in found)


def open_binary(path: str):
    """A binary stream of the file's bytes (gzip is left to the caller)."""
    if "://" not in path:
        return open(path, "rb")
    if _pyarrow_scheme(path):
        fs, inner = resolve(path)
        return fs.open_input_file(inner)
    import fsspec

    return fsspec.open(path, "rb").open()
