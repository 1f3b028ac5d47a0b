"""Input safety for the HTTP service: URI allow-lists, size limits, auth, redaction.

Every function here is pure (no Ray, no FastAPI) and raises `ApiError` with the HTTP status,
a stable error type and a message that says what was wrong and what is valid. Messages never
echo server paths that the client did not send, and `redact` removes DICOM patient
identifiers from any text before it reaches a log line or a response.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import os
import re
import stat
import zipfile
from collections.abc import Iterable, MutableSequence, Sequence

# A volume over the limits, declared or decoded (413): the one class the decoders raise too.
from pipeline.io.limits import VolumeLimitError  # noqa: F401 - re-exported for serve.app

# URI schemes that name an object store (bucket = first path component).
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs")
MAX_URI_CHARS = 2048
# A directory volume (DICOM series, slice folder) may hold at most this many entries.
MAX_DIRECTORY_ENTRIES = 4096
# DICOM attributes that identify a patient, an operator or an institution.
DICOM_IDENTIFIER_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "IssuerOfPatientID", "MedicalRecordLocator", "AccessionNumber", "StudyID",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
    "InstitutionAddress", "StationName", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber",
)
DICOM_HEAD_BYTES = 64 * 1024  # headers are read up to here, pixel data is never parsed
DICOM_MAX_FILES = 64
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(self, status: int, type_: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers or {}

    def to_body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"type": self.type, "message": self.message}}


def safe_text(text: str, max_chars: int = 500) -> str:
    """Strip control characters and truncate ``text`` for logs and error messages."""
    cleaned = _CONTROL_CHARS.sub(" ", str(text))
    return cleaned if len(cleaned) <= max_chars else cleaned[: max_chars - 3] + "..."


def redact(text: str, identifiers: Iterable[str]) -> str:
    """Replace every identifier (and its DICOM ``^``-separated parts) in ``text``."""
    out = str(text)
    values: set[str] = set()
    for ident in identifiers:
        ident = str(ident).strip()
        if ident:
            values.add(ident)
            values.update(part.strip() for part in ident.split("^") if len(part.strip()) >= 3)
    for value in sorted(values, key=len, reverse=True):
        out = out.replace(value, "[redacted]")
    return out


def _header_identifiers(head: bytes) -> list[str]:
    """Identifier values in one DICOM header (``head``: the file's first bytes)."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return []
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - unreadable headers carry no identifiers we can find
        return []
    found = []
    for keyword in DICOM_IDENTIFIER_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a truncated element
            continue
        if value is None:
            continue
        items = list(value) if isinstance(value, MutableSequence | tuple) else [value]
        found.extend(str(v) for v in items if str(v).strip())
    return found


def dicom_identifiers(data: bytes) -> list[str]:
    """Patient/institution identifiers in DICOM bytes: one file, or a zip of a series.

    Reads only headers (the first ``DICOM_HEAD_BYTES`` of at most ``DICOM_MAX_FILES`` files);
    anything unreadable contributes nothing.
    """
    if data[:4] != b"PK\x03\x04":
        return _header_identifiers(data[:DICOM_HEAD_BYTES])
    found: list[str] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist()[:DICOM_MAX_FILES]:
                with zf.open(info) as member:
                    found.extend(_header_identifiers(member.read(DICOM_HEAD_BYTES)))
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError):
        pass
    return found


def dicom_identifiers_at(path: str) -> list[str]:
    """:func:`dicom_identifiers` for a local file or a folder of DICOM files."""
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path))[:DICOM_MAX_FILES]
    found: list[str] = []
    for name in files:
        try:
            with open(name, "rb") as handle:
                found.extend(dicom_identifiers(handle.read(DICOM_HEAD_BYTES)))
        except OSError:
            continue
    return found


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Require ``Authorization: Bearer <token>`` when a token is configured (else allow).

    Raises:
        ApiError: 401 when the header is missing, malformed or carries another token.
    """
    if not token:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header",
                       challenge)
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'",
                       challenge)
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "invalid bearer token", challenge)


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Decode standard base64 (optionally a ``data:<mime>;base64,`` URL) within ``max_bytes``.

    Raises:
        ApiError: 413 if the decoded size would exceed ``max_bytes``; 400 if not valid base64.
    """
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, "invalid_volume_data",
                           "a data URL must look like 'data:<mime>;base64,<payload>'")
    payload = "".join(data.split())
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise ApiError(413, "volume_too_large",
                       f"the inline volume exceeds the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_volume_data",
                       "volume.data is not valid standard base64 "
                       "(RFC 4648, with padding)") from None
    if not raw:
        raise ApiError(400, "invalid_volume_data", "volume.data decodes to zero bytes")
    if len(raw) > max_bytes:
        raise ApiError(413, "volume_too_large",
                       f"the inline volume exceeds the limit of {max_bytes} bytes")
    return raw


def _split_scheme(uri: str) -> tuple[str | None, str]:
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        return scheme.lower(), rest
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri.split(":", 1)[0].lower(), uri.split(":", 1)[1]
    return None, uri


def _parse_bucket_entry(entry: str) -> tuple[str, str, str]:
    scheme, rest = _split_scheme(entry.strip())
    scheme = scheme or "s3"
    bucket, _, prefix = rest.strip("/").partition("/")
    return scheme, bucket, prefix.strip("/")


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _check_directory(real: str, root: str) -> None:
    """Every entry of a directory volume must resolve inside ``root`` (no symlink escape)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        for name in dirnames + filenames:
            count += 1
            if count > MAX_DIRECTORY_ENTRIES:
                raise ApiError(413, "volume_too_large",
                               "a directory volume may hold at most "
                               f"{MAX_DIRECTORY_ENTRIES} entries")
            if not _is_within(os.path.realpath(os.path.join(dirpath, name)), root):
                raise ApiError(403, "forbidden_uri",
                               "the volume directory contains a link that leaves the allowed roots")


def resolve_local_path(path: str, roots: Sequence[str]) -> str:
    """Resolve a client path to a real path inside one of ``roots``.

    Relative paths are taken relative to the first root. Symlinks are resolved before the
    check, so a link that leaves the roots is refused; so is every entry of a directory.

    Raises:
        ApiError: 403 outside the roots (or none configured), 404 missing, 400 not a file/dir.
    """
    if not roots:
        raise ApiError(403, "forbidden_uri",
                       "this server reads no local paths; send the volume inline or by an "
                       "allowed object-store URI")
    real_roots = [os.path.realpath(r) for r in roots]
    candidate = path if os.path.isabs(path) else os.path.join(real_roots[0], path)
    real = os.path.realpath(candidate)
    root = next((r for r in real_roots if _is_within(real, r)), None)
    if root is None:
        raise ApiError(403, "forbidden_uri", "the path is outside the allowed volume roots")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise ApiError(404, "volume_not_found", "no volume exists at the given path") from None
    except OSError:
        raise ApiError(400, "invalid_volume_uri", "the given path cannot be read") from None
    if stat.S_ISDIR(mode):
        _check_directory(real, root)
    elif not stat.S_ISREG(mode):
        raise ApiError(400, "invalid_volume_uri", "the path is not a regular file or directory")
    return real


def resolve_volume_uri(uri: str, *, local_roots: Sequence[str],
                       allowed_buckets: Sequence[str]) -> str:
    """Check a client-supplied volume URI against the allow-lists; return the URI to load.

    Valid: an object-store URI (``s3://bucket/key``) whose bucket (and optional prefix) is in
    ``allowed_buckets``; a local path (absolute, relative to the first root, or
    ``file://``) inside ``local_roots``. Everything else is refused: other schemes (http,
    memory, chained ``a::b`` fsspec URLs), ``..`` segments, control characters.

    Raises:
        ApiError: 400 malformed or unsupported scheme, 403 not allowed, 404 missing.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ApiError(400, "invalid_volume_uri", "volume.uri must be a non-empty string")
    if len(uri) > MAX_URI_CHARS or _CONTROL_CHARS.search(uri):
        raise ApiError(400, "invalid_volume_uri",
                       f"volume.uri must be at most {MAX_URI_CHARS} printable characters")
    if "::" in uri:
        raise ApiError(400, "invalid_volume_uri", "chained URLs ('a::b') are not accepted")
    if ".." in re.split(r"[\\/]", uri):
        raise ApiError(403, "forbidden_uri", "'..' path segments are not allowed")
    scheme, rest = _split_scheme(uri.strip())
    if scheme in (None, "file"):
        if scheme == "file" and rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return resolve_local_path(rest, local_roots)
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ApiError(400, "invalid_volume_uri",
                       f"unsupported URI scheme {safe_text(scheme, 20)!r}; valid: a local path, "
                       f"file://, or {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}")
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/") and not key.strip("/"):
        raise ApiError(400, "invalid_volume_uri", "an object-store URI needs a bucket and a key")
    for entry in allowed_buckets:
        e_scheme, e_bucket, e_prefix = _parse_bucket_entry(entry)
        same_scheme = e_scheme == scheme or {e_scheme, scheme} <= {"s3", "s3a"} or \
            {e_scheme, scheme} <= {"gs", "gcs"}
        if same_scheme and e_bucket == bucket and (
                not e_prefix or key == e_prefix or key.startswith(e_prefix + "/")):
            return f"{scheme}://{bucket}/{key}"
    raise ApiError(403, "forbidden_uri", "the bucket (or prefix) is not in the server's allow-list")


def check_volume_shape(shape: Sequence[int], *, max_slices: int, max_dim: int) -> None:
    """Refuse volumes with more slices than ``max_slices`` or a side above ``max_dim``.

    Raises:
        ApiError: 413 naming the limit.
    """
    if len(shape) >= 1 and shape[0] > max_slices:
        raise ApiError(413, "volume_too_large",
                       f"the volume has {shape[0]} slices; at most {max_slices} are accepted")
    if any(int(s) > max_dim for s in shape[1:3]):
        raise ApiError(413, "volume_too_large",
                       f"slice size {tuple(int(s) for s in shape[1:3])} exceeds {max_dim} pixels")
