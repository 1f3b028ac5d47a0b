"""Write (D, H, W) volumes in every readable format, to local paths or ``s3://``.

Used by the synthetic data generator, the tests and the benchmarks. Each writer stores the
geometry so that :func:`pipeline.io.volumes.load_volume` returns exactly the array that was
written (the canonical orientation of :mod:`pipeline.io.volume_decoders`), which the round-trip
tests check.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.io import storage as st
from pipeline.io.storage import StorageOptions

try:
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a declared dependency
    import gzip as _gzip  # type: ignore[no-redef]

WRITE_FORMATS = ("nifti", "npy", "nrrd", "dicom", "slices")


def nifti_bytes(volume: np.ndarray, spacing: tuple[float, float, float], *, gz: bool = True,
                compresslevel: int = 1) -> bytes:
    """Encode (D, H, W) as NIfTI-1 whose voxel axes are (L, P, S): loading gives it back."""
    import nibabel as nib

    sz, sy, sx = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])  # voxel i -> patient left, j -> posterior, k -> superior
    img = nib.Nifti1Image(np.asarray(volume).transpose(2, 1, 0), affine)  # (x, y, z)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    raw = img.to_bytes()
    return _gzip.compress(raw, compresslevel) if gz else raw


def npy_bytes(volume: np.ndarray, *, channel_first: bool = False) -> bytes:
    """Encode as ``.npy``; ``channel_first`` gives M3D's (1, D, H, W)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(volume)[None] if channel_first else np.asarray(volume))
    return buf.getvalue()


def nrrd_bytes(volume: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """Encode as a gzip NRRD in LPS space with axis-aligned directions."""
    import nrrd

    sz, sy, sx = (float(s) for s in spacing)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([sx, sy, sz]),
        "space origin": np.zeros(3),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    buf = io.BytesIO()
    nrrd.write(buf, np.asarray(volume).transpose(2, 1, 0), header, compression_level=1)
    return buf.getvalue()


def dicom_series_bytes(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    intercept: float = 0.0,
    extra_tags: dict[str, Any] | None = None,
    positions: bool = True,
    modality: str = "CT",
    series_uid: str | None = None,
) -> list[bytes]:
    """Encode (D, H, W) integer HU as one CT DICOM file per slice (axial, LPS, z ascending).

    Stored values are ``volume - intercept`` (uint16 when that is non-negative, else int16)
    with ``RescaleIntercept = intercept``. ``extra_tags`` are set on every file (tests use them
    to plant identifiers); ``positions=False`` omits ImagePositionPatient; ``series_uid``
    fixes the SeriesInstanceUID (default: a fresh one).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    stored = np.asarray(volume).astype(np.int32) - int(intercept)
    unsigned = stored.min() >= 0
    stored = stored.astype(np.uint16 if unsigned else np.int16)
    sz, sy, sx = (float(s) for s in spacing)
    series_uid, study_uid = series_uid or generate_uid(), generate_uid()
    out = []
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        if positions:
            ds.ImagePositionPatient = [0.0, 0.0, k * sz]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleIntercept = float(intercept)
        ds.RescaleSlope = 1.0
        for tag, value in (extra_tags or {}).items():
            setattr(ds, tag, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def png_bytes(slice_u8: np.ndarray) -> bytes:
    """Encode one (H, W) or (H, W, 3) uint8 slice as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(slice_u8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_volume(
    volume: np.ndarray,
    uri: str,
    format: str,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    storage: StorageOptions | None = None,
    channel_first: bool = False,
    slice_name: str = "{:03d}.png",
) -> str:
    """Write a volume in one of :data:`WRITE_FORMATS` and return its URI.

    Args:
        volume: (D, H, W) array (uint8 for "slices"; integer HU for "dicom").
        uri: target file, or folder for "dicom" and "slices".
        format: "nifti" (gzip when ``uri`` ends with .gz), "npy", "nrrd", "dicom", "slices".
        spacing: (z, y, x) voxel size in mm.
        storage: object-store options.
        channel_first: for "npy", write (1, D, H, W) like M3D.
        slice_name: file-name pattern for "slices" (zero-padded by default so the
            lexicographic order equals the numeric one).
    """
    if format == "nifti":
        st.write_bytes(uri, nifti_bytes(volume, spacing, gz=uri.endswith(".gz")), storage)
    elif format == "npy":
        st.write_bytes(uri, npy_bytes(volume, channel_first=channel_first), storage)
    elif format == "nrrd":
        st.write_bytes(uri, nrrd_bytes(volume, spacing), storage)
    elif format == "dicom":
        for k, data in enumerate(dicom_series_bytes(volume, spacing)):
            st.write_bytes(st.join_uri(uri, f"IM{k:04d}.dcm"), data, storage)
    elif format == "slices":
        if np.asarray(volume).dtype != np.uint8:
            raise ValueError(f"slice images need uint8 slices, got {np.asarray(volume).dtype}")
        for k, sl in enumerate(np.asarray(volume)):
            st.write_bytes(st.join_uri(uri, slice_name.format(k)), png_bytes(sl), storage)
    else:
        raise ValueError(f"unknown write format {format!r}; valid: {', '.join(WRITE_FORMATS)}")
    return uri
