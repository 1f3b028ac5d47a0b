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


def _plausible_raw_dicom(data: bytes) -> bool:
    """For files without the Part-10 preamble: does the first element look like a DICOM tag?

    A raw dataset starts with group 0x0002 (file meta) or 0x0008 (identifying information) in
    either byte order; anything else (zeros, text, another format) is refused here, because
    pydicom's forced parse of arbitrary bytes can take minutes on a large file.
    """
    if len(data) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(data[:2], order)
        if 0x0002 <= group <= 0x0028:
            return True
    return False


def read_dataset(data: bytes, source: str) -> Any:
    """Parse only geometry and pixel tags of one DICOM file (never identifiers)."""
    import pydicom

    if not looks_like_dicom(data) and not _plausible_raw_dicom(data):
        raise VolumeError(f"{source}: not a DICOM file (no 'DICM' preamble and no DICOM tag "
                          "at the start)")

    try:
        with warnings.catch_warnings():  # pydicom warnings may quote element values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(
                io.BytesIO(data), force=not looks_like_dicom(data),
                specific_tags=list(_GEOMETRY_TAGS + _PIXEL_TAGS),
            )
    except Exception as err:  # message may quote header bytes: report the type only
        raise VolumeError(f"{source}: not a readable DICOM file ({type(err).__name__})") from err


def declared_pixels(ds: Any, source: str) -> tuple[int, int, int, int]:
    """(frames, rows, columns, decoded bytes) the dataset declares, before any pixel decoding."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as err:
        raise VolumeError(f"{source}: DICOM image size tags are not numbers "
                          f"({type(err).__name__})") from err
    if min(rows, cols, frames, samples, bits) <= 0:
        raise VolumeError(f"{source}: DICOM file declares no image (Rows/Columns missing or 0)")
    return frames, rows, cols, frames * rows * cols * samples * max(1, -(-bits // 8))


def pixels(ds: Any, source: str, limits: Any = None) -> np.ndarray:
    """Stored pixel values of a dataset (no rescale): (H, W), (frames, H, W) or RGB.

    ``limits`` (a ``pipeline.io.limits.DecodeLimits``) is checked against Rows, Columns,
    NumberOfFrames, SamplesPerPixel and BitsAllocated before the pixels are decoded.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise VolumeError(f"{source}: DICOM file has no pixel data")
    if limits is not None:
        frames, rows, cols, nbytes = declared_pixels(ds, source)
        limits.check_declared(source, slices=frames, height=rows, width=cols, nbytes=nbytes)
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
        float(ds.RescaleIntercept) if "RescaleIntercept" in ds and ds.RescaleIntercept != ""
        else None
    )
    return slope, inter


def rescaled_pixels(data: bytes, source: str, limits: Any = None) -> np.ndarray:
    """One DICOM file's pixels with rescale applied (used by slice-image folders)."""
    ds = read_dataset(data, source)
    return scale_values(pixels(ds, source, limits), *_rescale(ds))


def _modality(ds: Any) -> str | None:
    value = str(ds.get("Modality", "") or "").strip().upper()
    return value or None


def _spacing_2d(ds: Any) -> tuple[float, float]:
    if "PixelSpacing" in ds and len(ds.PixelSpacing) == 2:
        row, col = (float(v) for v in ds.PixelSpacing)
        if row > 0 and col > 0:
            return row, col
    return 1.0, 1.0


def decode_dicom_file(data: bytes, source: str, limits: Any = None) -> dict[str, Any]:
    """A single DICOM file: one slice, or a multi-frame image taken in stored frame order."""
    ds = read_dataset(data, source)
    arr = pixels(ds, source, limits)
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


def decode_dicom_series(files: list[tuple[str, bytes]], source: str, limits: Any = None,
                        deadline: Any = None) -> dict[str, Any]:
    """Decode a series (one file per slice) ordered by position along the slice normal.

    Args:
        files: (name, bytes) of every file in the series folder.
        source: the folder, for messages.
        limits: a ``pipeline.io.limits.DecodeLimits``: the file count and every file's declared
            image size (and their sum) are checked before any pixels are decoded.
        deadline: a ``pipeline.io.limits.Deadline``, checked per file.

    Raises:
        VolumeError: no files, unreadable files, mixed series, missing or duplicate positions,
            differing orientations or slice sizes.
    """
    if not files:
        raise VolumeError(f"{source}: no DICOM files (zero slices)")
    if limits is not None and len(files) > limits.max_slices:
        limits.check_declared(source, slices=len(files), height=1, width=1, nbytes=0,
                              what="holds")
    datasets = []
    for name, data in files:
        datasets.append((name, read_dataset(data, name)))
        if deadline is not None:
            deadline.check(source)
    if limits is not None:
        total = 0
        for name, ds in datasets:
            frames, rows, cols, nbytes = declared_pixels(ds, name)
            limits.check_declared(name, slices=frames, height=rows, width=cols, nbytes=nbytes)
            total += nbytes
        limits.check_bytes(source, total, "declares")
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
        raise VolumeError(f"{source}: several DICOM files share a slice position "
                          "(repeated slices?)")
    ordered = [datasets[i] for i in order]
    stack = _stack_rescaled(ordered, source, deadline)  # (D, H, W[, 3])
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


def _stack_rescaled(ordered: list[tuple[str, Any]], source: str,
                    deadline: Any = None) -> np.ndarray:
    slices = []
    shape = None
    for name, ds in ordered:
        if deadline is not None:
            deadline.check(source)
        arr = pixels(ds, name)
        if shape is None:
            shape, first_name = arr.shape, name
        elif arr.shape != shape:
            raise VolumeError(
                f"{source}: slices of different sizes: {first_name} is {shape}, "
                f"{name} is {arr.shape}"
            )
        slices.append(arr)
    rescales = {_rescale(ds) for _, ds in ordered}
    if len(rescales) == 1:
        return scale_values(np.stack(slices), *rescales.pop())
    scaled = [scale_values(a, *_rescale(ds)).astype(np.float32)
              for a, (_, ds) in zip(slices, ordered, strict=True)]
    return np.stack(scaled)
