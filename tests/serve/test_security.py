"""Pure unit tests of serve.security: allow-lists, limits, auth, redaction (no Ray)."""

from __future__ import annotations

import base64
import io
import os

import pytest

from serve.security import (
    ApiError,
    check_bearer,
    check_volume_shape,
    decode_base64,
    dicom_identifiers,
    dicom_identifiers_at,
    redact,
    resolve_local_path,
    resolve_volume_uri,
)
from tests.helpers.serving import dicom_bytes


@pytest.fixture()
def roots(tmp_path):
    root = tmp_path / "volumes"
    (root / "ct").mkdir(parents=True)
    (root / "ct" / "a.npy").write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("server file")
    return root, secret


def _status(fn, *args, **kwargs) -> int:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value.status


def test_local_paths_inside_roots_resolve(roots):
    root, _ = roots
    real = os.path.realpath(root / "ct" / "a.npy")
    assert resolve_local_path(str(root / "ct" / "a.npy"), [str(root)]) == real
    assert resolve_local_path("ct/a.npy", [str(root)]) == real  # relative to the first root
    uri = resolve_volume_uri(f"file://{root}/ct/a.npy", local_roots=[str(root)],
                             allowed_buckets=[])
    assert uri == real


def test_local_paths_outside_roots_are_refused(roots):
    root, secret = roots
    assert _status(resolve_local_path, str(secret), [str(root)]) == 403
    assert _status(resolve_local_path, "/etc/passwd", [str(root)]) == 403
    assert _status(resolve_local_path, str(root / "ct" / "a.npy"), []) == 403
    assert _status(resolve_volume_uri, f"{root}/ct/../../secret.txt", local_roots=[str(root)],
                   allowed_buckets=[]) == 403
    assert _status(resolve_local_path, str(root / "missing.npy"), [str(root)]) == 404


def test_symlink_escape_is_refused(roots):
    root, secret = roots
    (root / "link.npy").symlink_to(secret)
    assert _status(resolve_local_path, str(root / "link.npy"), [str(root)]) == 403
    series = root / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x")
    assert resolve_local_path(str(series), [str(root)]) == os.path.realpath(series)
    (series / "2.dcm").symlink_to(secret)
    assert _status(resolve_local_path, str(series), [str(root)]) == 403
    (root / "inner.npy").symlink_to(root / "ct" / "a.npy")  # a link that stays inside is fine
    assert resolve_local_path(str(root / "inner.npy"), [str(root)]).endswith("a.npy")


def test_special_files_are_refused(roots):
    root, _ = roots
    os.mkfifo(root / "pipe.npy")
    assert _status(resolve_local_path, str(root / "pipe.npy"), [str(root)]) == 400


@pytest.mark.parametrize(("uri", "status"), [
    ("s3://scans/ct/x.nii.gz", None),
    ("s3://scans/ct/deep/x.npy", None),
    ("s3://other/ct/x.npy", 403),
    ("s3://scans/ctx/x.npy", 403),
    ("s3://open/anything.npy", None),
    ("s3://scans", 400),
    ("http://169.254.169.254/latest/meta-data", 400),
    ("memory://x.npy", 400),
    ("simplecache::s3://scans/ct/x.npy", 400),
    ("s3://scans/ct/../../other/x.npy", 403),
    ("s3://scans/ct/x\x00.npy", 400),
    ("", 400),
])
def test_object_store_allow_list(uri, status):
    kwargs = {"local_roots": [], "allowed_buckets": ["s3://scans/ct/", "open"]}
    if status is None:
        assert resolve_volume_uri(uri, **kwargs) == uri
    else:
        assert _status(resolve_volume_uri, uri, **kwargs) == status


def test_base64_decoding_limits():
    raw = bytes(range(256)) * 4
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, 4096) == raw
    assert decode_base64("data:application/x-npy;base64," + text, 4096) == raw
    assert _status(decode_base64, text, 100) == 413
    assert _status(decode_base64, "not base64!!", 4096) == 400
    assert _status(decode_base64, "", 4096) == 400
    assert _status(decode_base64, "data:application/x-npy," + text, 4096) == 400


def test_bearer_token():
    check_bearer(None, None)
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    for header in (None, "", "Basic s3cret", "Bearer", "Bearer wrong"):
        with pytest.raises(ApiError) as info:
            check_bearer(header, "s3cret")
        assert info.value.status == 401
        assert info.value.headers["WWW-Authenticate"] == "Bearer"
        assert "s3cret" not in info.value.message


def test_shape_limits():
    check_volume_shape((64, 512, 512), max_slices=64, max_dim=512)
    assert _status(check_volume_shape, (65, 8, 8), max_slices=64, max_dim=512) == 413
    assert _status(check_volume_shape, (4, 8, 1024), max_slices=64, max_dim=512) == 413


def test_dicom_identifiers_are_redacted():
    ids = dicom_identifiers(dicom_bytes())
    assert {"Doe^Jane", "PID-0042", "General Hospital"} <= set(ids)
    message = "x.dcm: bad pixel data for Doe^Jane (PID-0042) at General Hospital; Jane"
    cleaned = redact(message, ids)
    for secret in ("Doe", "Jane", "PID-0042", "General Hospital"):
        assert secret not in cleaned
    assert dicom_identifiers(b"not dicom") == []


def test_dicom_identifiers_in_zips_and_folders(tmp_path):
    import zipfile

    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        zf.writestr("series/1.dcm", dicom_bytes())
    assert "PID-0042" in dicom_identifiers(blob.getvalue())
    (tmp_path / "1.dcm").write_bytes(dicom_bytes())
    assert "Doe^Jane" in dicom_identifiers_at(str(tmp_path))
    assert "Doe^Jane" in dicom_identifiers_at(str(tmp_path / "1.dcm"))
