"""Decoders from bytes to canonical (D, H, W) arrays, one per volume format.

Canonical orientation (every format that carries geometry: NIfTI, NRRD, DICOM):
``array[z, y, x]`` holds axial slices, ``z`` from inferior to superior, each slice in the
radiological display convention: row 0 is anterior (rows run anterior -> posterior) and column
0 is the patient's right (columns run right -> left). That is the LPS+ voxel order, read with
the slice axis first; it is how a DICOM axial series looks when its slices are sorted by
position. The conversion picks the closest axis-aligned orientation of the affine (nibabel's
``io_orientation``) and only flips and transposes, so voxel values are never resampled. Formats
without geometry (NumPy, slice images) are taken as they are: (D, H, W).

Values keep their stored dtype (int16 HU stays int16): scaling (NIfTI ``scl_slope/scl_inter``,
DICOM rescale) is applied only when set, to an integer dtype when slope and intercept are
integers and the result fits, otherwise float32. Never float64.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import Any

import numpy as np

try:  # isal's igzip decodes gzip 2-3x faster than zlib; fall back when it is missing
    from isal import igzip as gzip_impl
    from isal import isal_zlib as zlib_impl
except ImportError:  # pragma: no cover - isal is a declared dependency
    gzip_impl = gzip  # type: ignore[assignment]
    zlib_impl = zlib  # type: ignore[assignment]

GZIP_MAGIC = b"\x1f\x8b"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CANONICAL_AXCODES = ("L", "P", "S")  # voxel axes (x, y, z) point to patient Left, Posterior, Superior


class VolumeError(ValueError):
    """A volume could not be read: the message names the source and what is wrong."""


def gunzip(data: bytes, source: str, max_bytes: int | None = None) -> bytes:
    """Decompress gzip ``data`` (isal when available), rejecting corrupt or truncated streams."""
    try:
        out = gzip_impl.decompress(data)
    except EOFError as err:
        raise VolumeError(f"{source}: truncated gzip stream ({err})") from err
    except (OSError, zlib.error, zlib_impl.error) as err:
        raise VolumeError(f"{source}: corrupt gzip stream ({err})") from err
    if max_bytes is not None and len(out) > max_bytes:
        raise VolumeError(f"{source}: decompresses to {len(out)} bytes, over the {max_bytes} cap")
    return out


def gunzip_head(data: bytes, nbytes: int, source: str) -> bytes:
    """The first ``nbytes`` of a gzip stream, without decompressing the rest."""
    try:
        dec = zlib_impl.decompressobj(31)
        return dec.decompress(data[: 1 << 16], nbytes)
    except (zlib.error, zlib_impl.error) as err:
        raise VolumeError(f"{source}: corrupt gzip stream ({err})") from err


def scale_values(arr: np.ndarray, slope: float | None, inter: float | None) -> np.ndarray:
    """Apply ``arr * slope + inter`` keeping integers integral when possible; never float64."""
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if slope == 1.0 and inter == 0.0:
        return arr
    if arr.dtype.kind in "iub" and slope.is_integer() and inter.is_integer():
        lo = float(arr.min()) * slope + inter
        hi = float(arr.max()) * slope + inter
        lo, hi = min(lo, hi), max(lo, hi)
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                if slope == 1.0 and dtype == np.int16:  # the common CT case: one pass
                    return np.add(arr, np.int16(inter), dtype=np.int16)
                out = arr.astype(np.int64 if dtype == np.int32 else np.int32)  # no overflow
                out *= int(slope)
                out += int(inter)
                return out.astype(dtype)
    out = arr.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(inter)
    return out


def canonical_transform(affine_ras: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], str]:
    """The flips/transposes that take voxel axes (i, j, k) to (L, P, S), for an affine.

    Returns:
        (nibabel orientation transform (3, 2): per voxel axis its target axis and flip,
        spacing (z, y, x) in mm after the transform, original axis codes like "RAS").
    """
    from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform

    affine = np.asarray(affine_ras, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    start = io_orientation(affine)
    if np.isnan(start).any() or not np.all(zooms > 0):  # degenerate affine: trust the voxel order
        start = axcodes2ornt(("R", "A", "S"))
        zooms = np.where(zooms > 0, zooms, 1.0)
        codes = "?"
    else:
        codes = "".join(str(c) for c in aff2axcodes(affine))
    xform = ornt_transform(start, axcodes2ornt(CANONICAL_AXCODES))
    out_zooms = [1.0, 1.0, 1.0]
    for axis, (target, _flip) in enumerate(xform):
        out_zooms[int(target)] = float(zooms[axis])
    return xform, (out_zooms[2], out_zooms[1], out_zooms[0]), codes


def apply_canonical(data_xyz: np.ndarray, xform: np.ndarray) -> np.ndarray:
    """Apply :func:`canonical_transform`'s result: (i, j, k[, c]) -> (z, y, x[, c]) view."""
    from nibabel.orientations import apply_orientation

    arr = apply_orientation(data_xyz, xform)  # (x, y, z[, c]) in L, P, S order, still a view
    return arr.transpose((2, 1, 0, *range(3, arr.ndim)))


def to_canonical(data_xyz: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], str]:
    """Reorient voxel data to the canonical (z, y, x) order of the module docstring.

    Args:
        data_xyz: voxel array indexed (i, j, k[, c]) as the affine describes.
        affine_ras: 4x4 voxel-to-RAS+ world affine (NIfTI convention).

    Returns:
        (array (D, H, W[, C]) as a strided view, spacing (z, y, x) in mm, original axcodes).
    """
    xform, spacing, codes = canonical_transform(affine_ras)
    return apply_canonical(data_xyz, xform), spacing, codes


def squeeze_to_3d(shape: tuple[int, ...], source: str) -> tuple[int, ...]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise VolumeError(
            f"{source}: expected a 3-D volume (x, y, z), got shape {shape}; "
            "4-D series and 2-D images are not volumes"
        )
    if min(dims) == 0:
        raise VolumeError(f"{source}: empty volume, shape {shape} (zero slices)")
    return tuple(dims)


def decode_npy(data: bytes, source: str) -> dict[str, Any]:
    """Decode a ``.npy``: (D, H, W), (1, D, H, W) (M3D's channel-first) or (D, H, W, 3) uint8."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(f"{source}: not a readable .npy array ({err})") from err
    if not isinstance(arr, np.ndarray):
        raise VolumeError(f"{source}: expected one .npy array, got {type(arr).__name__}")
    if arr.dtype.kind not in "biuf":
        raise VolumeError(f"{source}: unsupported dtype {arr.dtype}; expected numbers")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    elif not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise VolumeError(
            f"{source}: expected shape (D, H, W), (1, D, H, W) or (D, H, W, 3), got {arr.shape}"
        )
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return {"array": np.ascontiguousarray(arr), "spacing": (1.0, 1.0, 1.0), "meta": {}}


def decode_nrrd(data: bytes, source: str, max_bytes: int) -> dict[str, Any]:
    """Decode an attached-header NRRD (raw or gzip encoding) with pynrrd."""
    import nrrd

    fh = io.BytesIO(data)
    try:
        header = nrrd.read_header(fh)
        if "data file" in header or "datafile" in header:
            raise VolumeError(
                f"{source}: detached NRRD header (.nhdr); convert to a single .nrrd file"
            )
        sizes = [int(s) for s in header.get("sizes", [])]
        dtype = nrrd.reader._determine_datatype(header)  # noqa: SLF001 - pynrrd has no public one
        nbytes = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
        if nbytes > max_bytes:
            raise VolumeError(f"{source}: NRRD declares {nbytes} bytes, over the {max_bytes} cap")
        data_xyz = nrrd.read_data(header, fh, None, index_order="F")
    except VolumeError:
        raise
    except Exception as err:  # pynrrd raises NRRDError, ValueError, zlib.error, ...
        raise VolumeError(f"{source}: corrupt or truncated NRRD ({type(err).__name__}: {err})") from err
    squeeze_to_3d(data_xyz.shape, source)
    if data_xyz.ndim != 3:
        data_xyz = data_xyz.reshape(squeeze_to_3d(data_xyz.shape, source), order="F")
    arr, spacing, codes = to_canonical(data_xyz, _nrrd_affine(header))
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return {"array": arr, "spacing": spacing, "meta": {"orientation_in": codes}}


def _nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    """Voxel-to-RAS+ affine from NRRD ``space``/``space directions``/``space origin``."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        dirs = np.array(
            [np.zeros(3) if d is None or np.isnan(np.asarray(d, float)).any() else d
             for d in directions], dtype=float)
        if dirs.shape == (3, 3):
            affine[:3, :3] = dirs.T  # column i = direction of voxel axis i
    elif header.get("spacings") is not None:
        affine[:3, :3] = np.diag([float(s) for s in header["spacings"][:3]])
    origin = header.get("space origin")
    if origin is not None and len(origin) == 3:
        affine[:3, 3] = np.asarray(origin, dtype=float)
    space = str(header.get("space", "")).lower()
    if space in ("left-posterior-superior", "lps", "left-posterior-superior-time"):
        affine[:2] *= -1  # LPS world -> RAS world
    return affine


def decode_image(data: bytes, source: str) -> np.ndarray:
    """One 2-D slice image -> (H, W) (grey, 8/16-bit) or (H, W, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img)
            elif img.mode == "1":
                arr = np.asarray(img.convert("L"))
            else:
                arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise VolumeError(f"{source}: corrupt or unreadable image ({err})") from err
    if arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        arr = arr[..., 0]
    return arr
