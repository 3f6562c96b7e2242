"""The OpenAI Files API's storage: uploaded batch inputs and the batches' output and error files.

A file is its bytes plus OpenAI's file object (``id`` "file-...", ``bytes``, ``created_at``,
``filename``, ``purpose``, ``status`` "processed"). With a directory (``moonlet serve`` uses
``$MOONLET_HOME/batches/files``), each file is ``DIR/<id>`` (the bytes) and ``DIR/<id>.json`` (the
object), so files outlive a restart as the batches do; without one they live in memory. The routes
are in ``openai_batches.py``.
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

    def add(self, content: bytes, filename: str, purpose: str) -> dict:
        """Store ``content``; returns its file object."""
        meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
                "status_details": None}
        t = time.time()
        if self.directory is None:
            self._data[meta["id"]] = content
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / meta["id"]
            with open(path, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            tmp = self.directory / f"{meta['id']}.json.tmp"
            tmp.write_text(json.dumps({**meta, "_t": t}))
            os.replace(tmp, self.directory / f"{meta['id']}.json")
        self.meta[meta["id"]] = meta
        self._time[meta["id"]] = t
        return meta

    def get(self, file_id: str) -> dict:
        meta = self.meta.get(file_id)
        if meta is None:
            raise APIError("not_found", f"no file {file_id!r} on this server", param="file_id")
        return meta

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        if self.directory is None:
            return self._data[file_id]
        return (self.directory / file_id).read_bytes()

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        del self.meta[file_id], self._time[file_id]
        if self.directory is None:
            del self._data[file_id]
        else:
            for p in (self.directory / f"{file_id}.json", self.directory / file_id):
                p.unlink(missing_ok=True)

    def list(self, purpose: str | None = None) -> list[dict]:
        """The file objects, newest first (``purpose``: only those)."""
        files = [m for m in self.meta.values() if purpose is None or m["purpose"] == purpose]
        return sorted(files, key=lambda m: self._time[m["id"]], reverse=True)
