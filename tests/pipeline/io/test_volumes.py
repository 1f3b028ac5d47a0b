"""Volumes: every format round trip (local and S3), canonical orientation, DICOM privacy and
ordering, every bad-input case, uploads, and a real chest CT end to end."""

from __future__ import annotations

import gzip
import io
import logging
import os
import zipfile

import nibabel as nib
import numpy as np
import pytest

from pipeline.io import storage as st
from pipeline.io.limits import DecodeLimits, VolumeLimitError
from pipeline.io.volumes import FORMATS, VolumeError, decode_volume, detect_format, load_volume
from pipeline.io.writers import dicom_series_bytes, nifti_bytes, npy_bytes, png_bytes, write_volume

SPACING = (5.0, 0.75, 0.5)


@pytest.fixture(scope="module")
def hu_volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1024, 1500, size=(6, 10, 12)).astype(np.int16)  # (D, H, W)


CASES = [("nifti", "v.nii.gz"), ("nifti", "v.nii"), ("npy", "v.npy"), ("nrrd", "v.nrrd"),
         ("dicom", "series"), ("slices", "slices")]


def _write(volume, base, fmt, name, storage=None):
    data = volume if fmt != "slices" else (volume.astype(np.int32) % 256).astype(np.uint8)
    return write_volume(data, st.join_uri(base, name), fmt, spacing=SPACING, storage=storage), data


@pytest.mark.parametrize(("fmt", "name"), CASES)
def test_round_trip_local(tmp_path, hu_volume, fmt, name):
    uri, expected = _write(hu_volume, str(tmp_path), fmt, name)
    assert detect_format(uri) == fmt
    vol = load_volume(uri)
    assert vol.format == fmt and vol.array.dtype == expected.dtype
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.array.flags.c_contiguous and vol.array.flags.writeable
    if fmt in ("nifti", "nrrd", "dicom"):
        assert vol.spacing == pytest.approx(SPACING)
    assert vol.modality == ("OT" if fmt == "slices" else "CT")


@pytest.mark.s3
@pytest.mark.parametrize(("fmt", "name"), CASES)
def test_round_trip_s3(s3_storage, s3_prefix, hu_volume, fmt, name):
    uri, expected = _write(hu_volume, s3_prefix, fmt, name, s3_storage)
    vol = load_volume(uri, storage=s3_storage)
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.source == uri and vol.format == fmt


def test_nifti_orientation_is_canonical(tmp_path, hu_volume):
    """The same anatomy stored RAS, or with permuted axes, loads as the same (z, y, x) array."""
    sz, sy, sx = SPACING
    ras_data = hu_volume[:, ::-1, ::-1].transpose(2, 1, 0)  # (x: R->L reversed, y: A, z)
    ras_affine = np.diag([sx, sy, sz, 1.0])
    nib.save(nib.Nifti1Image(ras_data, ras_affine), tmp_path / "ras.nii.gz")
    permuted = ras_data.transpose(2, 0, 1)  # voxel axes (z, x, y)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = sz, sx, sy, 1.0
    nib.save(nib.Nifti1Image(permuted, affine), tmp_path / "perm.nii")
    for name in ("ras.nii.gz", "perm.nii"):
        vol = load_volume(str(tmp_path / name))
        np.testing.assert_array_equal(vol.array, hu_volume)
        assert vol.spacing == pytest.approx(SPACING)


@pytest.mark.parametrize("zflip", [False, True])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_nifti_gz_streamed_in_blocks(tmp_path, hu_volume, monkeypatch, zflip, byteorder):
    """Slices inflated in a worker thread and placed chunk by chunk, flips included."""
    import pipeline.io.nifti

    sz, sy, sx = SPACING
    data = hu_volume[:, ::-1, ::-1].transpose(2, 1, 0)  # RAS voxel order: in-plane flips
    affine = np.diag([sx, sy, sz, 1.0])
    if zflip:  # stored superior -> inferior
        data, affine[2, 2] = data[:, :, ::-1], -sz
    img = nib.Nifti1Image(data.astype(byteorder + "i2"), affine)
    nib.save(img, tmp_path / "s.nii.gz")
    # tiny inflate steps: chunks end mid-slice, so slices are assembled across chunks
    monkeypatch.setattr(pipeline.io.nifti, "_INPUT_STEP", 97)
    vol = load_volume(str(tmp_path / "s.nii.gz"))
    np.testing.assert_array_equal(vol.array, hu_volume)
    assert vol.array.dtype == np.dtype("int16") and vol.array.dtype.isnative


def test_nifti_scaling_keeps_integers_and_never_float64(tmp_path, hu_volume):
    stored = (hu_volume.astype(np.int32) + 1024).astype(np.uint16)
    img = nib.Nifti1Image(stored.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = load_volume(str(tmp_path / "scaled.nii.gz"))
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, hu_volume)
    img.header.set_slope_inter(0.5, 0.25)
    nib.save(img, tmp_path / "float.nii")
    assert load_volume(str(tmp_path / "float.nii")).array.dtype == np.float32


def test_npy_layouts(tmp_path):
    cube = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    for arr in (cube, cube[None], (cube[..., None] * np.ones(3) * 255).astype(np.uint8)):
        np.save(tmp_path / "a.npy", arr)
        vol = load_volume(str(tmp_path / "a.npy"))
        assert vol.array.shape[:3] == (4, 5, 6)
    assert vol.array.shape == (4, 5, 6, 3) and vol.modality == "OT"


def test_dicom_series_order_rescale_and_privacy(tmp_path, hu_volume, caplog):
    secrets = {"PatientName": "DOE^JANE", "PatientID": "PID-778899", "PatientBirthDate": "19700101"}
    files = dicom_series_bytes(hu_volume, SPACING, intercept=-1024, extra_tags=secrets,
                               series_uid="1.2.3.4")
    folder = tmp_path / "series"
    folder.mkdir()
    order = np.random.default_rng(3).permutation(len(files))  # names say nothing about position
    for name_index, k in enumerate(order):
        (folder / f"{name_index:03d}.dcm").write_bytes(files[k])
    with caplog.at_level(logging.DEBUG):
        vol = load_volume(str(folder))
    np.testing.assert_array_equal(vol.array, hu_volume)
    assert vol.array.dtype == np.int16 and vol.modality == "CT"
    odd = np.zeros((len(files) + 1, 5, 12), np.int16)  # last slice: a new position, 5 rows
    odd_files = dicom_series_bytes(odd, SPACING, extra_tags=secrets, series_uid="1.2.3.4")
    (folder / "odd.dcm").write_bytes(odd_files[-1])
    with caplog.at_level(logging.DEBUG), pytest.raises(VolumeError, match="different sizes") as err:
        load_volume(str(folder))
    seen = str(err.value) + caplog.text + repr(vol.meta)
    for value in ("DOE", "JANE", "778899", "19700101"):
        assert value not in seen


def test_dicom_without_positions_is_rejected(tmp_path, hu_volume):
    folder = tmp_path / "nopos"
    for k, data in enumerate(dicom_series_bytes(hu_volume, SPACING, positions=False)):
        st.write_bytes(str(folder / f"{k}.dcm"), data)
    with pytest.raises(VolumeError, match="without ImagePositionPatient") as err:
        load_volume(str(folder))
    assert str(folder) in str(err.value)


def test_slice_order_lexicographic_by_default_natural_on_request(tmp_path):
    slices = (np.arange(12)[:, None, None] * np.ones((1, 4, 4))).astype(np.uint8)  # value = index
    write_volume(slices, str(tmp_path / "s"), "slices", slice_name="{}.png")
    lexi = load_volume(str(tmp_path / "s"))
    assert lexi.array[:, 0, 0].tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    natural = load_volume(str(tmp_path / "s"), slice_order="natural")
    assert natural.array[:, 0, 0].tolist() == list(range(12))


def _nii_gz(volume):
    return nifti_bytes(volume, SPACING, gz=True)


BAD_CASES = {
    "corrupt gzip": ("x.nii.gz", lambda v: b"\x1f\x8b\x08\x00" + os.urandom(200),
                     "corrupt|truncated"),
    "truncated gzip": ("x.nii.gz", lambda v: _nii_gz(v)[:-100], "truncated"),
    "truncated nii": ("x.nii", lambda v: nifti_bytes(v, SPACING, gz=False)[:-50], "truncated"),
    "not nifti": ("x.nii", lambda v: b"hello" * 100, "not a NIfTI"),
    "4-D nifti": ("x.nii", lambda v: nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16),
                                                     np.eye(4)).to_bytes(),
                  "3-D"),
    "2-D npy": ("x.npy", lambda v: npy_bytes(np.zeros((4, 4))), "expected shape"),
    "NaN npy": ("x.npy", lambda v: npy_bytes(np.full((2, 3, 3), np.nan, np.float32)), "NaN"),
    "inf npy": ("x.npy", lambda v: npy_bytes(np.array([[[np.inf]]], np.float32)),
                "NaN or infinite"),
    "zero slices": ("x.npy", lambda v: npy_bytes(np.zeros((0, 4, 4), np.int16)), "zero slices"),
    "corrupt npy": ("x.npy", lambda v: b"\x93NUMPY garbage", "not a readable"),
    "corrupt nrrd": ("x.nrrd", lambda v: b"NRRD0004\ntype: short\nsizes: 4 4\n", "NRRD"),
    "unknown suffix": ("x.xyz", lambda v: b"123", "valid: nifti, npy, dicom, slices, nrrd"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_volume_error_naming_the_file(tmp_path, hu_volume, case):
    name, make, message = BAD_CASES[case]
    path = tmp_path / name
    path.write_bytes(make(hu_volume))
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(str(path))
    assert str(path) in str(err.value) or "x.xyz" in str(err.value)


def test_bad_folders_and_caps(tmp_path, hu_volume):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="empty"):
        load_volume(str(tmp_path / "empty"), format="slices")
    mixed = tmp_path / "mixed"
    st.write_bytes(str(mixed / "0.png"), png_bytes(np.zeros((4, 4), np.uint8)))
    st.write_bytes(str(mixed / "1.png"), png_bytes(np.zeros((5, 4), np.uint8)))
    with pytest.raises(VolumeError, match="different sizes"):
        load_volume(str(mixed))
    st.write_bytes(str(tmp_path / "broken" / "0.png"), b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(VolumeError, match="0.png"):
        load_volume(str(tmp_path / "broken"))
    uri, _ = _write(hu_volume, str(tmp_path), "nifti", "big.nii.gz")
    with pytest.raises(VolumeError, match="cap"):
        load_volume(uri, max_bytes=100)
    small = DecodeLimits(max_decoded_bytes=hu_volume.nbytes - 1)  # decoded size: the limits
    with pytest.raises(VolumeLimitError, match="over the limit"):  # small file, large voxels
        load_volume(uri, max_bytes=st.file_size(uri) + 10, limits=small)
    with pytest.raises(VolumeError, match="cannot read"):
        load_volume(str(tmp_path / "missing.nii.gz"))
    with pytest.raises(VolumeError, match="valid: nifti"):
        load_volume(uri, format="analyze")


def test_decode_uploads(tmp_path, hu_volume):
    np.testing.assert_array_equal(decode_volume(_nii_gz(hu_volume), "nifti").array, hu_volume)
    np.testing.assert_array_equal(decode_volume(npy_bytes(hu_volume), "scan.npy").array, hu_volume)
    raw = nifti_bytes(hu_volume, SPACING, gz=False)  # a multi-member gzip (e.g. from pigz/bgzip)
    two_members = gzip.compress(raw[:600]) + gzip.compress(raw[600:])
    np.testing.assert_array_equal(decode_volume(two_members, "x.nii.gz").array, hu_volume)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, data in enumerate(dicom_series_bytes(hu_volume, SPACING)[::-1]):
            zf.writestr(f"series/{k}.dcm", data)
    np.testing.assert_array_equal(decode_volume(buf.getvalue(), "dicom").array, hu_volume)
    np.testing.assert_array_equal(decode_volume(buf.getvalue(), "upload.zip").array, hu_volume)
    single = decode_volume(dicom_series_bytes(hu_volume, SPACING)[2], "dcm")
    np.testing.assert_array_equal(single.array, hu_volume[2:3])
    with pytest.raises(VolumeError, match="over the 10 cap"):
        decode_volume(npy_bytes(hu_volume), "npy", max_bytes=10)
    with pytest.raises(VolumeError, match="unknown volume format 'tiff3d'; valid"):
        decode_volume(b"abc", "tiff3d")
    with pytest.raises(VolumeError, match="upload.nii"):
        decode_volume(gzip.compress(b"x" * 600), "nifti", source="upload.nii")
    assert set(FORMATS) == {"nifti", "npy", "dicom", "slices", "nrrd"}


@pytest.mark.network_registry
def test_real_chest_ct_end_to_end(lung_ct_nrrd, tmp_path):
    import nrrd

    from pruning.ops.windowing import apply_named_window, pack_three_windows

    vol = load_volume(str(lung_ct_nrrd))
    assert vol.array.shape == (48, 512, 512) and vol.array.dtype == np.int16
    assert vol.spacing == pytest.approx((5.0, 0.5703125, 0.5703125))
    assert vol.modality == "CT" and vol.array.min() == -1024
    raw, _ = nrrd.read(str(lung_ct_nrrd))  # LPS, identity directions: already canonical
    np.testing.assert_array_equal(vol.array, raw.transpose(2, 1, 0))
    # the lungs are air-filled: a lung window shows them dark, the soft-tissue window saturates
    mid = vol.array[24]
    lung = apply_named_window(mid, "lung")
    assert lung.dtype == np.uint8 and 0 < lung.mean() < 255
    assert pack_three_windows(vol.array[20:22]).shape == (2, 512, 512, 3)
    # the same CT through NIfTI (the format 3D-RAD and AMOS ship) reads back identically
    uri = write_volume(vol.array, str(tmp_path / "lung.nii.gz"), "nifti", spacing=vol.spacing)
    again = load_volume(uri)
    np.testing.assert_array_equal(again.array, vol.array)
    assert again.spacing == pytest.approx(vol.spacing)
