"""Content identities of volumes: what tells one version of a volume's bytes from another.

A cache of pruned volumes may only answer for the same bytes, so its keys are built from a
content identity, never from a URI alone (an object rewritten in place keeps its URI):

- inline bytes: their sha256;
- a local file: its path with its size, modification time (ns) and inode;
- an ``s3://`` object: its URI with the store's ETag and size (asked afresh, never from a
  cached listing);
- a folder (DICOM series, slice images) or prefix: the same facts for every file in it.

A store that gives no ETag gives no identity (None), and then nothing is reused. Identities
are sha256 digests: the URI (a patient's folder name, say) never appears in clear, and
neither identities nor keys are logged.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pipeline.io.storage import (
    StorageOptions,
    filesystem_for,
    is_local,
    local_path,
    split_protocol,
)


def digest(*parts: str) -> str:
    """sha256 hex digest of ``parts`` (length-prefixed, so no two part lists collide)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def bytes_identity(data: bytes) -> str:
    """The identity of a volume given inline: the sha256 of its bytes (hex)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _local_version(path: str) -> str:
    stat = os.stat(path)
    if not os.path.isdir(path):
        return f"file {stat.st_size} {stat.st_mtime_ns} {stat.st_ino}"
    entries = []
    with os.scandir(path) as listing:
        for entry in listing:
            if entry.is_file():
                info = entry.stat()
                entries.append(f"{entry.name} {info.st_size} {info.st_mtime_ns} {info.st_ino}")
    return "folder " + "\n".join(sorted(entries))


def _etag(info: dict[str, Any]) -> str | None:
    for key, value in info.items():
        if key.lower() == "etag" and value:
            return str(value)
    return None


def _object_version(uri: str, storage: StorageOptions | None) -> str | None:
    fs, path = filesystem_for(uri, storage)
    # s3fs answers from its listing cache unless told otherwise: a stale ETag would reuse an
    # object rewritten since.
    refresh = {"refresh": True} if split_protocol(uri)[0] == "s3" else {}
    info = fs.info(path, **refresh)
    if info.get("type") != "directory":
        etag = _etag(info)
        return None if etag is None else f"object {etag} {info.get('size')}"
    entries = []
    for entry in fs.ls(path, detail=True, **refresh):
        if entry.get("type") != "file":
            continue
        etag = _etag(entry)
        if etag is None:
            return None
        entries.append(f"{entry['name']} {etag} {entry.get('size')}")
    return "prefix " + "\n".join(sorted(entries))


def volume_identity(uri: str, storage: StorageOptions | None = None) -> str | None:
    """The content identity of the volume stored at ``uri`` (hashed), or None when the store
    cannot tell versions apart (no ETag) or the volume cannot be looked up.

    Reading it costs one ``stat`` (local) or one HEAD request (object store), a listing for
    a folder; never the bytes.
    """
    try:
        if is_local(uri):
            path = os.path.abspath(local_path(uri))
            version = _local_version(path)
        else:
            path, version = uri, _object_version(uri, storage)
    except Exception:  # noqa: BLE001 - no identity means no reuse; loading reports the error
        return None
    return None if version is None else "version:" + digest(path, version)
