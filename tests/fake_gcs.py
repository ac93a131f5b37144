"""An in-memory Google Cloud Storage server for tests: gs:// paths without network or credentials.

It is gcp-storage-emulator's in-memory server with what the real service does and tensorstore
(orbax's array store) relies on, but the emulator leaves out: the object generation in download
headers, generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`), and many
connections at once (requests are still applied one at a time: its storage is not thread-safe).
Everything that talks to gs:// is pointed at it through the standard variables: gcsfs (and so
etils.epath) reads STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()
_PATCHED = False


def _generation(storage, bucket: str, name: str) -> str | None:
    try:
        return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
        return None


def _precondition_failed(request, storage, bucket: str, name: str) -> HTTPStatus | None:
    current = _generation(storage, bucket, name)
    match = request.query.get("ifGenerationMatch")
    if match:
        wanted = match[0]
        if (wanted == "0" and current is not None) or (wanted != "0" and current != wanted):
            return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match and current is not None and current == not_match[0]:
        return HTTPStatus.NOT_MODIFIED
    return None


def _download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    failed = _precondition_failed(request, storage, bucket, name)
    if failed is not None:
        response.status = failed
        return
    _original_download(request, response, storage, *args, **kwargs)
    generation = _generation(storage, bucket, name)
    if generation is not None:
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"


def _insert(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    if name is not None:
        failed = _precondition_failed(request, storage, request.params["bucket_name"], name)
        if failed is not None:
            response.status = failed
            return
    _original_insert(request, response, storage, *args, **kwargs)


_original_download, _original_insert = objects.download, objects.insert


def _serialized(handle):
    def run(self, method):
        with _LOCK:
            handle(self, method)
    return run


class _Server(ThreadingHTTPServer):
    """Many clients at once (tensorstore opens dozens of connections), quiet when one hangs up."""

    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        pass


def _run_api(self):
    self._httpd = _Server((self._host, self._port),
                          functools.partial(emulator.RequestHandler, self._storage))
    self.is_running.set()
    self._httpd.serve_forever()


def _patch_emulator() -> None:
    global _PATCHED
    if _PATCHED:
        return
    objects.download, objects.insert = _download, _insert  # `get` and the router call these
    for _, handlers in emulator.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is _original_download:
                handlers[method] = _download
            elif handler is _original_insert:
                handlers[method] = _insert
    emulator.Router.handle = _serialized(emulator.Router.handle)
    emulator.APIThread.run = _run_api
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no credentials" for every bucket
    _PATCHED = True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def fake_gcs(bucket: str) -> Iterator[str]:
    """Serves an empty in-memory `bucket` and points this process (and the processes it starts)
    at it; yields the server's URL."""
    _patch_emulator()
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
