"""One way to open any URI: local paths, ``file://`` and ``s3://`` (plus any other fsspec protocol).

:class:`StorageOptions` is the single typed description of an object store (endpoint,
credentials, region, retries, timeouts). It builds both an fsspec/s3fs filesystem (for our own
reads and writes) and a ``pyarrow.fs.S3FileSystem`` (for Ray Data readers and writers), so a
job configures S3 once. Credentials left unset are read from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``
/ ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``). Secrets never appear in a
repr or log line.
"""

from __future__ import annotations

import os
import posixpath
import random
import time
from collections.abc import Callable
from typing import IO, Any, Literal, TypeVar
from urllib.parse import urlparse

import fsspec
from pydantic import BaseModel, ConfigDict, Field, SecretStr

LOCAL_PROTOCOLS = ("", "file", "local")
T = TypeVar("T")


class StorageOptions(BaseModel):
    """Object-store settings shared by fsspec/s3fs and pyarrow (Ray Data).

    Every field is optional: unset credentials, endpoint and region fall back to the standard
    AWS environment variables, then to the client libraries' own defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. 'http://127.0.0.1:8333'; None = AWS (or env)"
    )
    key: str | None = Field(None, description="access key id; None = $AWS_ACCESS_KEY_ID")
    secret: SecretStr | None = Field(
        None, description="secret access key; None = $AWS_SECRET_ACCESS_KEY"
    )
    token: SecretStr | None = Field(None, description="session token; None = $AWS_SESSION_TOKEN")
    region: str | None = Field(None, description="region; None = $AWS_REGION/$AWS_DEFAULT_REGION")
    anon: bool = Field(False, description="unsigned (anonymous) requests, for public buckets")
    retries: int = Field(5, ge=0, le=50, description="retries per request (attempts = 1 + this)")
    connect_timeout_s: float = Field(10.0, gt=0, description="connection timeout in seconds")
    read_timeout_s: float = Field(60.0, gt=0, description="read/request timeout in seconds")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket addressing; 'path' for most self-hosted S3 servers"
    )
    verify_ssl: bool = Field(True, description="verify TLS certificates of an https endpoint")
    use_env: bool = Field(True, description="fill unset fields from the AWS environment variables")

    def resolved(self) -> StorageOptions:
        """A copy with unset fields filled from the environment (when ``use_env``)."""
        if not self.use_env:
            return self
        env = os.environ
        updates: dict[str, Any] = {}
        if self.endpoint_url is None:
            updates["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if self.key is None and not self.anon:
            updates["key"] = env.get("AWS_ACCESS_KEY_ID")
        if self.secret is None and not self.anon and env.get("AWS_SECRET_ACCESS_KEY"):
            updates["secret"] = SecretStr(env["AWS_SECRET_ACCESS_KEY"])
        if self.token is None and not self.anon and env.get("AWS_SESSION_TOKEN"):
            updates["token"] = SecretStr(env["AWS_SESSION_TOKEN"])
        if self.region is None:
            updates["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        return self.model_copy(update={k: v for k, v in updates.items() if v is not None})

    def s3fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (also usable as fsspec storage_options)."""
        opts = self.resolved()
        config: dict[str, Any] = {
            "retries": {"max_attempts": opts.retries + 1, "mode": "standard"},
            "connect_timeout": opts.connect_timeout_s,
            "read_timeout": opts.read_timeout_s,
        }
        if opts.addressing_style != "auto":
            config["s3"] = {"addressing_style": opts.addressing_style}
        client: dict[str, Any] = {}
        if opts.region:
            client["region_name"] = opts.region
        if not opts.verify_ssl:
            client["verify"] = False
        kwargs: dict[str, Any] = {"anon": opts.anon, "config_kwargs": config,
                                  "client_kwargs": client}
        if opts.endpoint_url:
            kwargs["endpoint_url"] = opts.endpoint_url
        if opts.key and not opts.anon:
            kwargs["key"] = opts.key
        if opts.secret is not None and not opts.anon:
            kwargs["secret"] = opts.secret.get_secret_value()
        if opts.token is not None and not opts.anon:
            kwargs["token"] = opts.token.get_secret_value()
        return kwargs

    def pyarrow_s3(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` with the same endpoint, credentials and retries."""
        from pyarrow import fs as pafs

        opts = self.resolved()
        kwargs: dict[str, Any] = {
            "anonymous": opts.anon,
            "connect_timeout": opts.connect_timeout_s,
            "request_timeout": opts.read_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=opts.retries + 1),
        }
        if opts.endpoint_url:
            parsed = urlparse(opts.endpoint_url)
            if parsed.scheme:
                kwargs["scheme"] = parsed.scheme
                kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            else:
                kwargs["endpoint_override"] = opts.endpoint_url
        if opts.region:
            kwargs["region"] = opts.region
        if opts.addressing_style == "virtual":
            kwargs["force_virtual_addressing"] = True
        if not opts.anon:
            if opts.key:
                kwargs["access_key"] = opts.key
            if opts.secret is not None:
                kwargs["secret_key"] = opts.secret.get_secret_value()
            if opts.token is not None:
                kwargs["session_token"] = opts.token.get_secret_value()
        if not opts.verify_ssl:
            kwargs["tls_verify_certificates"] = False
        return pafs.S3FileSystem(**kwargs)


def split_protocol(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("", path)`` for a local path."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return "", uri
    protocol, rest = uri.split("://", 1)
    protocol = protocol.lower()
    if protocol in ("s3a", "s3n"):
        protocol = "s3"
    if protocol == "file":
        return "file", rest
    return protocol, rest


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return split_protocol(uri)[0] in LOCAL_PROTOCOLS


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file:///a/b`` -> ``/a/b``, ``~`` expanded)."""
    protocol, path = split_protocol(uri)
    if protocol not in LOCAL_PROTOCOLS:
        raise ValueError(f"{uri!r} is not a local path")
    return os.path.expanduser(path)


def filesystem_for(uri: str, storage: StorageOptions | None = None) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path within it)`` for ``uri``.

    ``storage`` configures ``s3://`` URIs (default: :class:`StorageOptions` from the
    environment); other protocols use fsspec's defaults.
    """
    protocol, path = split_protocol(uri)
    if protocol in LOCAL_PROTOCOLS:
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if protocol == "s3":
        opts = storage or StorageOptions()
        return fsspec.filesystem("s3", **opts.s3fs_kwargs()), path
    return fsspec.filesystem(protocol), path


def pyarrow_filesystem(uri: str, storage: StorageOptions | None = None) -> tuple[Any, str]:
    """Return ``(pyarrow.fs.FileSystem, path)`` for Ray Data's ``filesystem=`` argument.

    For ``s3://bucket/key`` the path is ``bucket/key`` (pyarrow's convention).
    """
    from pyarrow import fs as pafs

    protocol, path = split_protocol(uri)
    if protocol in LOCAL_PROTOCOLS:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if protocol == "s3":
        return (storage or StorageOptions()).pyarrow_s3(), path.rstrip("/")
    fs, fs_path = filesystem_for(uri, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs_path


def open_uri(uri: str, mode: str = "rb", storage: StorageOptions | None = None) -> IO[Any]:
    """Open ``uri`` like :func:`open` (binary or text); parent folders are created for writes."""
    fs, path = filesystem_for(uri, storage)
    if any(flag in mode for flag in "wax"):
        parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
        if is_local(uri) and parent:
            os.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str, storage: StorageOptions | None = None) -> bytes:
    """Read a whole object or file."""
    if is_local(uri):
        with open(local_path(uri), "rb") as fh:
            return fh.read()
    fs, path = filesystem_for(uri, storage)
    return fs.cat_file(path)


def read_many(uris: list[str], storage: StorageOptions | None = None) -> list[bytes]:
    """Read several objects of one filesystem, concurrently where the filesystem supports it."""
    if not uris:
        return []
    if all(is_local(u) for u in uris):
        return [read_bytes(u) for u in uris]
    fs, _ = filesystem_for(uris[0], storage)
    paths = [filesystem_for(u, storage)[1] for u in uris]
    got = fs.cat(paths, on_error="raise")
    return [got[p] for p in paths]


def write_bytes(uri: str, data: bytes, storage: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri``, replacing it; local parent folders are created."""
    with open_uri(uri, "wb", storage) as fh:
        fh.write(data)


def exists(uri: str, storage: StorageOptions | None = None) -> bool:
    """True if a file, object or folder (prefix) exists at ``uri``."""
    fs, path = filesystem_for(uri, storage)
    return bool(fs.exists(path))


def is_dir(uri: str, storage: StorageOptions | None = None) -> bool:
    """True if ``uri`` is a folder (local) or a non-empty prefix (object store)."""
    fs, path = filesystem_for(uri, storage)
    return bool(fs.isdir(path))


def file_size(uri: str, storage: StorageOptions | None = None) -> int:
    """Size in bytes of a file or object."""
    if is_local(uri):
        return os.path.getsize(local_path(uri))
    fs, path = filesystem_for(uri, storage)
    return int(fs.size(path))


def _to_uri(uri: str, found: str) -> str:
    """Turn a path returned by a filesystem listing back into a URI like ``uri``."""
    protocol, _ = split_protocol(uri)
    if protocol == "":
        return found
    return f"{protocol}://{found.lstrip('/') if protocol != 'file' else found}"


def list_with_sizes(
    uri: str,
    storage: StorageOptions | None = None,
    *,
    recursive: bool = False,
) -> list[tuple[str, int]]:
    """``(uri, size in bytes)`` of the files under a folder or prefix, sorted by URI."""
    fs, path = filesystem_for(uri, storage)
    if recursive:
        entries = fs.find(path, detail=True).values()
    else:
        entries = fs.ls(path, detail=True)
    files = [(_to_uri(uri, e["name"]), int(e.get("size") or 0)) for e in entries
             if e.get("type") == "file"]
    return sorted(files)


def list_uri(
    uri: str,
    storage: StorageOptions | None = None,
    *,
    recursive: bool = False,
    suffixes: tuple[str, ...] | None = None,
) -> list[str]:
    """List the files under a folder or prefix, as sorted URIs of the same form as ``uri``.

    Args:
        uri: folder path or ``s3://bucket/prefix``.
        storage: object-store options.
        recursive: include files in sub-folders.
        suffixes: keep only names ending with one of these (case-insensitive), e.g. ``(".png",)``.
    """
    found = [u for u, _ in list_with_sizes(uri, storage, recursive=recursive)]
    if suffixes:
        lowered = tuple(s.lower() for s in suffixes)
        found = [f for f in found if f.lower().endswith(lowered)]
    return found


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or path; an absolute part (or a URI) replaces what precedes it."""
    result = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        if "://" in part or part.startswith("/"):
            result = part
        elif is_local(result) and "://" not in result:
            result = os.path.join(result, part)
        else:
            result = posixpath.join(result, part)
    return result


def parent_uri(uri: str) -> str:
    """The folder containing ``uri`` (``s3://b/a/m.json`` -> ``s3://b/a``)."""
    protocol, path = split_protocol(uri)
    if protocol == "":
        return os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    return f"{protocol}://{posixpath.dirname(path.rstrip('/'))}"


def basename(uri: str) -> str:
    """The last path component of ``uri`` (without a trailing slash)."""
    return posixpath.basename(split_protocol(uri)[1].rstrip("/"))


# --- telling storage outages from bad files ------------------------------------------------

# Exception class names (botocore, aiohttp, urllib3, builtins) that mean "the store did not
# answer": worth retrying later. Matched by name so this module needs none of those packages.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ConnectionError", "HTTPClientError", "ClientConnectorError",
    "ClientConnectionError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
    "ClientPayloadError", "TimeoutError", "ConnectTimeout", "ReadTimeout", "NewConnectionError",
    "ProtocolError", "IncompleteReadError", "ResponseStreamingError",
})
# The store answered, but the server side is misconfigured (no credentials): not the file's
# fault, and fixed by an operator, so a later attempt may succeed too.
_CREDENTIAL_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "NoAuthTokenError", "UnauthorizedSSOTokenError",
})
_THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "RequestThrottled", "TooManyRequestsException", "ServiceUnavailable", "InternalError",
    "503", "500", "502", "504", "429",
})


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts (at most 10, no cycles)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 10 and not any(current is s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _client_error_transient(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code in _THROTTLING_CODES or int(status) >= 500 or int(status) == 429


def is_credentials_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the server has no usable credentials."""
    return any(type(e).__name__ in _CREDENTIAL_NAMES for e in _chain(exc))


def is_transient(exc: BaseException) -> bool:
    """True for a storage problem that a later attempt may not have: connection errors,
    timeouts, throttling, 5xx answers, missing credentials (anywhere in the exception chain).

    A bad file (corrupt, missing, forbidden, over a limit) is permanent: False.
    """
    for e in _chain(exc):
        name = type(e).__name__
        if name in _TRANSIENT_NAMES or name in _CREDENTIAL_NAMES:
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if _client_error_transient(e):
            return True
    return False


def call_with_retries(fn: Callable[[], T], *, retries: int, backoff_s: float,
                      retry_if: Callable[[BaseException], bool] = is_transient,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; on a retryable error wait ``backoff_s * 2**attempt`` (+ up to 25 % jitter)
    and try again, at most ``retries`` more times. Other errors, and the last one, propagate.

    Missing credentials are not retried here (each attempt may spend seconds probing for
    them and they do not appear by themselves); they still count as transient for a resume.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not retry_if(exc) or is_credentials_error(exc):
                raise
            sleep(backoff_s * 2**attempt * (1 + 0.25 * random.random()))
            attempt += 1
