"""DICOM series and files to canonical volumes, without ever touching patient identifiers.

Only the tags needed for geometry and pixels are parsed (``dcmread(specific_tags=...)``), so
names, IDs and dates are never even decoded, and no error message includes a header value.
A series is ordered by ``ImagePositionPatient`` projected on the slice normal
(``ImageOrientationPatient`` row x column); a series without positions is rejected, because
file names and ``InstanceNumber`` do not reliably give anatomical order. Rescale slope and
intercept are applied (per slice when they differ). The result is reoriented like NIfTI (see
:mod:`pipeline.io.volume_decoders`).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from pipeline.io.volume_decoders import VolumeError, scale_values, to_canonical

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_GEOMETRY_TAGS = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "InstanceNumber", "Modality",
    "SeriesInstanceUID",
)
_PIXEL_TAGS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)


def looks_like_dicom(data: bytes) -> bool:
    """True for Part-10 files (``DICM`` at byte 128)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dataset(data: bytes, source: str) -> Any:
    """Parse only geometry and pixel tags of one DICOM file (never identifiers)."""
    import pydicom

    try:
        with warnings.catch_warnings():  # pydicom warnings may quote element values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(
                io.BytesIO(data), force=not looks_like_dicom(data),
                specific_tags=list(_GEOMETRY_TAGS + _PIXEL_TAGS),
            )
    except Exception as err:  # message may quote header bytes: report the type only
        raise VolumeError(f"{source}: not a readable DICOM file ({type(err).__name__})") from err


def pixels(ds: Any, source: str) -> np.ndarray:
    """Stored pixel values of a dataset (no rescale): (H, W), (frames, H, W) or RGB."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError(f"{source}: DICOM file has no pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as err:  # pixel errors name transfer syntaxes / plugins, not patients
        raise VolumeError(
            f"{source}: cannot decode DICOM pixel data ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    return np.asarray(arr)


def _rescale(ds: Any) -> tuple[float | None, float | None]:
    slope = float(ds.RescaleSlope) if "RescaleSlope" in ds and ds.RescaleSlope != "" else None
    inter = (
        float(ds.RescaleIntercept) if "RescaleIntercept" in ds and ds.RescaleIntercept != "" else None
    )
    return slope, inter


def rescaled_pixels(data: bytes, source: str) -> np.ndarray:
    """One DICOM file's pixels with rescale applied (used by slice-image folders)."""
    ds = read_dataset(data, source)
    return scale_values(pixels(ds, source), *_rescale(ds))


def _modality(ds: Any) -> str | None:
    value = str(ds.get("Modality", "") or "").strip().upper()
    return value or None


def _spacing_2d(ds: Any) -> tuple[float, float]:
    if "PixelSpacing" in ds and len(ds.PixelSpacing) == 2:
        row, col = (float(v) for v in ds.PixelSpacing)
        if row > 0 and col > 0:
            return row, col
    return 1.0, 1.0


def decode_dicom_file(data: bytes, source: str) -> dict[str, Any]:
    """A single DICOM file: one slice, or a multi-frame image taken in stored frame order."""
    ds = read_dataset(data, source)
    arr = pixels(ds, source)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[None]
    arr = scale_values(arr, *_rescale(ds))
    row, col = _spacing_2d(ds)
    thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
    return {
        "array": np.ascontiguousarray(arr),
        "spacing": (thickness, row, col),
        "modality": _modality(ds),
        "meta": {"dicom_files": 1, "frames": frames},
    }


def decode_dicom_series(files: list[tuple[str, bytes]], source: str) -> dict[str, Any]:
    """Decode a series (one file per slice) ordered by position along the slice normal.

    Args:
        files: (name, bytes) of every file in the series folder.
        source: the folder, for messages.

    Raises:
        VolumeError: no files, unreadable files, mixed series, missing or duplicate positions,
            differing orientations or slice sizes.
    """
    if not files:
        raise VolumeError(f"{source}: no DICOM files (zero slices)")
    datasets = [(name, read_dataset(data, name)) for name, data in files]
    if len({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}) > 1:
        raise VolumeError(f"{source}: folder mixes several DICOM series; give one series folder")
    missing = [n for n, ds in datasets if "ImagePositionPatient" not in ds]
    if missing:
        raise VolumeError(
            f"{source}: DICOM series without ImagePositionPatient in {len(missing)} of "
            f"{len(datasets)} files (e.g. {missing[0]}); slice order cannot be established"
        )
    first = datasets[0][1]
    iop = np.asarray([float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    for name, ds in datasets:
        other = ds.get("ImageOrientationPatient", None)
        if other is not None and not np.allclose([float(v) for v in other], iop, atol=1e-3):
            raise VolumeError(f"{source}: {name} has a different ImageOrientationPatient")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    if len(depth) > 1 and np.min(np.diff(depth)) < 1e-4:
        raise VolumeError(f"{source}: several DICOM files share a slice position (repeated slices?)")
    ordered = [datasets[i] for i in order]
    stack = _stack_rescaled(ordered, source)  # (D, H, W[, 3])
    row_sp, col_sp = _spacing_2d(first)
    dz = float(np.median(np.diff(depth))) if len(depth) > 1 else float(
        first.get("SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_sp  # voxel axis i: along a row (column index)
    affine_lps[:3, 1] = col_cos * row_sp  # voxel axis j: down a column (row index)
    affine_lps[:3, 2] = normal * dz
    affine_lps[:3, 3] = positions[order[0]]
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    data_xyz = stack.transpose(2, 1, 0, *range(3, stack.ndim))
    arr, spacing, codes = to_canonical(data_xyz, affine_ras)
    return {
        "array": np.ascontiguousarray(arr),
        "spacing": spacing,
        "modality": _modality(first),
        "meta": {"dicom_files": len(files), "orientation_in": codes},
    }


def _stack_rescaled(ordered: list[tuple[str, Any]], source: str) -> np.ndarray:
    slices = []
    shape = None
    for name, ds in ordered:
        arr = pixels(ds, name)
        if shape is None:
            shape, first_name = arr.shape, name
        elif arr.shape != shape:
            raise VolumeError(
                f"{source}: slices of different sizes: {first_name} is {shape}, {name} is {arr.shape}"
            )
        slices.append(arr)
    rescales = {_rescale(ds) for _, ds in ordered}
    if len(rescales) == 1:
        return scale_values(np.stack(slices), *rescales.pop())
    scaled = [scale_values(a, *_rescale(ds)).astype(np.float32) for a, (_, ds) in zip(slices, ordered, strict=True)]
    return np.stack(scaled)
