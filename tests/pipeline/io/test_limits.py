"""Bounded decoding: every bomb kind is refused before allocation, fast, with bounded memory.

The memory check decodes every bomb in a fresh subprocess and reads its peak resident size
(``ru_maxrss``) before and after: refusing on declared sizes must not allocate what the
bomb declares, and capped inflation must stop at the cap.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.limits import DecodeLimits, VolumeLimitError, inflate_capped
from pipeline.io.storage import call_with_retries, is_credentials_error, is_transient
from pipeline.io.volumes import VolumeError, decode_volume
from tests.helpers.bombs import BOMBS, MiB, garbage_zip_member

REPO = Path(__file__).resolve().parents[3]
LIMITS = DecodeLimits(max_decoded_bytes=64 * MiB, max_slices=64, max_slice_pixels=512 * 512)
STORED_CAP = 1 << 30  # the stored-size cap is not what stops a bomb


@pytest.mark.parametrize("codec", ["gzip", "bzip2"])
def test_inflate_capped_stops_at_the_cap(codec: str) -> None:
    compress = gzip.compress if codec == "gzip" else bz2.compress
    payload = os.urandom(100_000) + bytes(900_000)
    data = compress(payload) + compress(b"tail")  # two members/streams
    assert inflate_capped(data, codec, len(payload) + 4, "x") == payload + b"tail"
    with pytest.raises(VolumeLimitError, match="more than the limit of 999999"):
        inflate_capped(data, codec, len(payload) - 1, "x")
    with pytest.raises(VolumeError, match="truncated"):
        inflate_capped(compress(payload)[:-20], codec, len(payload), "x")


@pytest.mark.parametrize("kind", list(BOMBS))
def test_bomb_is_refused_as_over_the_limits(kind: str) -> None:
    data, fmt = BOMBS[kind]()
    with pytest.raises(VolumeLimitError, match="limit"):
        decode_volume(data, fmt, source="bomb", max_bytes=STORED_CAP, limits=LIMITS)


def test_garbage_named_dicom_is_refused_before_pydicom_parses_it() -> None:
    data, fmt = garbage_zip_member()
    with pytest.raises(VolumeError, match="not a DICOM file"):
        decode_volume(data, fmt, source="junk", max_bytes=STORED_CAP, limits=LIMITS)


_MEASURE = r"""
import json, resource, sys
import numpy as np
from pipeline.io.limits import DecodeLimits, VolumeLimitError
from pipeline.io.volumes import decode_volume
from pipeline.io.writers import nifti_bytes

limits = DecodeLimits.model_validate_json(sys.argv[1])
# warm up every decoder's imports on a small valid volume, then take the baseline
small = np.zeros((4, 16, 16), np.int16)
decode_volume(nifti_bytes(small, (1.0, 1.0, 1.0)), "nifti", limits=limits)
import nrrd, pydicom, PIL.Image  # noqa: E401,F401
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
rises = {}
for path, fmt, name in json.loads(sys.argv[2]):
    data = open(path, "rb").read()
    try:
        decode_volume(data, fmt, source=name, max_bytes=1 << 30, limits=limits)
        rises[name] = "decoded"
    except VolumeLimitError:
        rises[name] = peak() - base
print(json.dumps(rises))
"""


def test_bombs_raise_peak_memory_by_far_less_than_they_declare(tmp_path: Path) -> None:
    jobs = []
    for i, (kind, make) in enumerate(BOMBS.items()):
        data, fmt = make()
        path = tmp_path / f"bomb{i}"
        path.write_bytes(data)
        jobs.append((str(path), fmt, kind))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _MEASURE, LIMITS.model_dump_json(),
                           json.dumps(jobs)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rises = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(rises) == set(BOMBS)
    for kind, rise in rises.items():
        assert rise != "decoded", kind
        assert rise < 100 * MiB, f"{kind}: peak memory rose by {rise / MiB:.0f} MiB"


def test_defaults_pass_a_600_slice_ct() -> None:
    limits = DecodeLimits()
    for itemsize in (2, 4):  # int16 HU, or float32
        limits.check_declared("ct", slices=600, height=512, width=512,
                              nbytes=600 * 512 * 512 * itemsize)
    with pytest.raises(VolumeLimitError):
        limits.check_declared("ct", slices=2000, height=512, width=512, nbytes=1)


def test_small_volume_within_limits_decodes_in_every_path() -> None:
    from pipeline.io.writers import nifti_bytes, npy_bytes

    volume = np.arange(4 * 16 * 16, dtype=np.int16).reshape(4, 16, 16)
    for data, fmt in ((nifti_bytes(volume, (1.0, 1.0, 1.0)), "nifti"), (npy_bytes(volume), "npy")):
        out = decode_volume(data, fmt, limits=LIMITS)
        np.testing.assert_array_equal(out.array, volume)


def test_text_file_named_nifti_is_not_a_nifti_file() -> None:
    with pytest.raises(VolumeError, match="not a NIfTI file"):
        decode_volume(b"hello, this is a text file and certainly no volume\n" * 20, "scan.nii.gz")
    with pytest.raises(VolumeError, match="not a NIfTI file"):
        decode_volume(gzip.compress(b"plain text, gzip-compressed\n" * 40), "scan.nii.gz")


def test_transient_errors_are_told_from_bad_files() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def chained(cause: BaseException) -> VolumeError:
        try:
            raise VolumeError("s3://b/k: cannot read") from cause
        except VolumeError as err:
            return err

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(chained(ConnectionRefusedError(111, "refused")))
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(NoCredentialsError()) and is_credentials_error(NoCredentialsError())
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(chained(FileNotFoundError("k")))
    assert not is_transient(VolumeLimitError("too big"))


def test_call_with_retries_backs_off_then_gives_up() -> None:
    calls, waits = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert call_with_retries(flaky, retries=3, backoff_s=1.0, sleep=waits.append) == "ok"
    assert len(calls) == 3 and len(waits) == 2 and 1.0 <= waits[0] < waits[1] <= 2.5

    def bad_file() -> None:
        calls.append(1)
        raise VolumeError("corrupt")

    calls.clear()
    with pytest.raises(VolumeError):
        call_with_retries(bad_file, retries=3, backoff_s=1.0, sleep=waits.append)
    assert len(calls) == 1  # permanent: no retry


def test_decoding_has_a_time_budget() -> None:
    from pipeline.io.limits import DecodeTimeoutError
    from pipeline.io.writers import nifti_bytes

    data = nifti_bytes(np.zeros((8, 64, 64), np.int16), (1.0, 1.0, 1.0))
    spent = DecodeLimits(max_decode_s=1e-9)  # spent before the first inflated chunk arrives
    with pytest.raises(DecodeTimeoutError, match="budget"):
        decode_volume(data, "nifti", limits=spent)
