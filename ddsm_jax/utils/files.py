"""Every path the project reads or writes: local paths and object-store URIs (gs://...) alike,
through `etils.epath`, with writes that appear whole or not at all on both.

A local write goes to a temporary file beside its target and is renamed into place. An object
store has no atomic rename, but a single upload is atomic: the object appears when the upload
completes, never half written. So a remote write is built in memory and uploaded in one piece.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from etils import epath

from ddsm_jax.common_types import PathLike

GCS_ENDPOINT = ("storage.googleapis.com", 443)


class StorageError(OSError):
    """A workdir or file location that cannot be used (no network, no credentials, no library)."""


def is_remote(path: PathLike) -> bool:
    """True for URIs such as gs://bucket/dir, false for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: local paths made absolute (orbax asks for that), URIs kept as they are
    (`epath.Path('gs://b/x').absolute()` would make the local path `$PWD/gs:/b/x`)."""
    path = epath.Path(path)
    return path if is_remote(path) else path.absolute()


def write_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> epath.Path:
    """Calls `write(handle)` and puts the bytes at `path` in one atomic step (see the module
    docstring), so a crash never leaves half a file where a reader or a resumed run would look."""
    path = as_path(path)
    if is_remote(path):
        buffer = io.BytesIO()
        write(buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private
        os.replace(tmp_name, path)
    except BaseException:
        epath.Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: PathLike, text: str) -> epath.Path:
    return write_atomically(path, lambda handle: handle.write(text.encode()))


def write_json(path: PathLike, data: Any, indent: int | None = 1) -> epath.Path:
    return write_text_atomically(path, json.dumps(data, indent=indent))


def read_json(path: PathLike) -> Any:
    return json.loads(epath.Path(path).read_text())


def check_storage(path: PathLike, timeout: float = 5.0) -> None:
    """Fails fast, with one line saying what is missing, where `path` is on an object store that
    cannot be reached from here; a local path passes. Without this check a gs:// workdir with no
    network stalls for minutes in the storage library's retries before it fails."""
    path = os.fspath(path)
    if not is_remote(path):
        return
    scheme = path.split("://", 1)[0]
    if scheme != "gs":
        return  # other stores (s3://, ...) report their own errors through fsspec
    try:
        import gcsfs  # noqa: F401
    except ImportError as error:
        raise StorageError(f"{path}: gs:// paths need the gcsfs package (pip install gcsfs)") from error
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    host, port = GCS_ENDPOINT
    if emulator:
        netloc = emulator.split("://", 1)[-1].rstrip("/")
        host, _, port_text = netloc.partition(":")
        port = int(port_text or 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise StorageError(f"{path}: cannot reach Google Cloud Storage at {host}:{port} "
                           f"({error.strerror or error}); check the network, or use a local "
                           f"--workdir") from error
    if emulator:
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as error:
        raise StorageError(f"{path}: no Google Cloud credentials found; run `gcloud auth "
                           f"application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
                           ) from error
