"""The OpenAI Files API's storage: uploaded batch inputs and the batches' output and error files.

A file is its bytes plus OpenAI's file object (``id`` "file-...", ``bytes``, ``created_at``,
``filename``, ``purpose``, ``status`` "processed"). With a directory (``moonlet serve`` uses
``$MOONLET_HOME/batches/files``), each file is ``DIR/<id>`` (the bytes) and ``DIR/<id>.json`` (the
object), so files outlive a restart as the batches do; without one they live in memory. The routes
are in ``openai_batches.py``.

A file may expire (``expires_at`` in its object: an upload's ``expires_after``, a batch's
``output_expires_after``); an expired file is gone for every route from that moment, and its bytes
are deleted by the next ``sweep`` (the batch manager sweeps every few minutes) or when it is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from .errors import APIError

logger = logging.getLogger(__name__)

PURPOSES = ("batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals")


class FileStore:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.meta: dict[str, dict] = {}
        self._data: dict[str, bytes] = {}  # in memory only
        self._time: dict[str, float] = {}  # id -> exact creation time, for the listing's order
        if self.directory is not None and self.directory.is_dir():
            for p in sorted(self.directory.glob("*.json")):
                try:
                    meta = json.loads(p.read_text())
                    t = meta.pop("_t", meta["created_at"])
                    if (self.directory / meta["id"]).is_file():
                        self.meta[meta["id"]] = meta
                        self._time[meta["id"]] = t
                except (OSError, ValueError, KeyError) as e:
                    logger.warning("skipping file record %s: %s", p, e)
            for p in self.directory.glob("file-*"):
                if p.suffix == "" and p.name not in self.meta:  # written by a writer that never committed
                    p.unlink(missing_ok=True)

    def add(self, content: bytes, filename: str, purpose: str, expires_at: int | None = None) -> dict:
        """Store ``content``; returns its file object."""
        writer = self.writer()
        writer.write(content)
        return writer.commit(filename, purpose, expires_at)

    def writer(self) -> "FileWriter":
        """A file written in pieces (a batch's output), stored once ``commit`` is called."""
        return FileWriter(self)

    def _register(self, file_id: str, meta: dict) -> dict:
        t = time.time()
        if self.directory is not None:
            tmp = self.directory / f"{file_id}.json.tmp"
            tmp.write_text(json.dumps({**meta, "_t": t}))
            os.replace(tmp, self.directory / f"{file_id}.json")
        self.meta[file_id] = meta
        self._time[file_id] = t
        return meta

    def get(self, file_id: str) -> dict:
        meta = self.meta.get(file_id)
        if meta is not None and meta.get("expires_at") is not None and meta["expires_at"] <= time.time():
            self._remove(file_id)
            meta = None
        if meta is None:
            raise APIError("not_found", f"no file {file_id!r} on this server (never uploaded, deleted or expired)",
                           param="file_id")
        return meta

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        if self.directory is None:
            return self._data[file_id]
        return (self.directory / file_id).read_bytes()

    def path(self, file_id: str) -> Path | None:
        """Where the file's bytes are (None for a store in memory)."""
        self.get(file_id)
        return None if self.directory is None else self.directory / file_id

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self._remove(file_id)

    def _remove(self, file_id: str) -> None:
        self.meta.pop(file_id, None)
        self._time.pop(file_id, None)
        if self.directory is None:
            self._data.pop(file_id, None)
        else:
            for p in (self.directory / f"{file_id}.json", self.directory / file_id):
                p.unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the files whose ``expires_at`` has passed; returns their ids."""
        now = time.time() if now is None else now
        gone = [fid for fid, m in list(self.meta.items()) if m.get("expires_at") is not None and m["expires_at"] <= now]
        for fid in gone:
            self._remove(fid)
        return gone

    def list(self, purpose: str | None = None) -> list[dict]:
        """The file objects that have not expired, newest first (``purpose``: only those)."""
        now = time.time()
        files = [m for m in self.meta.values() if (purpose is None or m["purpose"] == purpose)
                 and (m.get("expires_at") is None or m["expires_at"] > now)]
        return sorted(files, key=lambda m: self._time[m["id"]], reverse=True)


class FileWriter:
    """A new file of a ``FileStore``, written piece by piece: on disk into its final name (the file
    only exists for the store once its record is written by ``commit``), in memory into a buffer."""

    def __init__(self, store: FileStore):
        self.store = store
        self.id = f"file-{uuid.uuid4().hex[:24]}"
        self.bytes = 0
        self._parts: list[bytes] = []
        self._fh = None
        if store.directory is not None:
            store.directory.mkdir(parents=True, exist_ok=True)
            self._fh = open(store.directory / self.id, "wb")

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._fh is None:
            self._parts.append(data)
        else:
            self._fh.write(data)

    def commit(self, filename: str, purpose: str, expires_at: int | None = None) -> dict:
        """Store the file; returns its file object."""
        if self._fh is None:
            self.store._data[self.id] = b"".join(self._parts)
            self._parts = []
        else:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        meta = {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(time.time()),
                "expires_at": expires_at, "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None}
        return self.store._register(self.id, meta)

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            (self.store.directory / self.id).unlink(missing_ok=True)
        self._parts = []
