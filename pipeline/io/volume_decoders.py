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

import io
import zlib
from typing import Any

import numpy as np

from pipeline.io.limits import (
    VolumeError,
    VolumeLimitError,
    gzip_impl,
    inflate_capped,
    zlib_impl,
)

GZIP_MAGIC = b"\x1f\x8b"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# voxel axes (x, y, z) point to patient Left, Posterior, Superior
CANONICAL_AXCODES = ("L", "P", "S")


def gunzip(data: bytes, source: str, max_bytes: int | None = None) -> bytes:
    """Decompress gzip ``data`` (isal when available), rejecting corrupt or truncated streams.

    With ``max_bytes`` the output is capped while inflating (``pipeline.io.limits``): a bomb
    stops at the cap, whatever its header claimed.
    """
    if max_bytes is not None:
        return inflate_capped(data, "gzip", max_bytes, source)
    try:
        return gzip_impl.decompress(data)
    except EOFError as err:
        raise VolumeError(f"{source}: truncated gzip stream ({err})") from err
    except (OSError, zlib.error, zlib_impl.error) as err:
        raise VolumeError(f"{source}: corrupt gzip stream ({err})") from err


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


def to_canonical(
    data_xyz: np.ndarray, affine_ras: np.ndarray
) -> tuple[np.ndarray, tuple[float, ...], str]:
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


def declared_geometry(shape3: tuple[int, ...], xform: np.ndarray) -> tuple[int, int, int]:
    """(slices, height, width) of voxel axes ``shape3`` once reoriented by ``xform``."""
    out = [1, 1, 1]  # targets: 0 = x (width), 1 = y (height), 2 = z (slices)
    for axis, (target, _flip) in enumerate(xform):
        out[int(target)] = int(shape3[axis])
    return out[2], out[1], out[0]


def _npy_header(data: bytes, source: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header, without reading the array."""
    fmt = np.lib.format
    fh = io.BytesIO(data)
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:  # 3.0 only adds UTF-8 field names (structured dtypes, refused anyway)
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise VolumeError(f"{source}: not a readable .npy array ({err})") from err
    return tuple(int(s) for s in shape), np.dtype(dtype)


def decode_npy(data: bytes, source: str, limits: Any = None) -> dict[str, Any]:
    """Decode a ``.npy``: (D, H, W), (1, D, H, W) (M3D's channel-first) or (D, H, W, 3) uint8.

    The header's shape and dtype are checked against ``limits`` (a
    ``pipeline.io.limits.DecodeLimits``) before the array is read.
    """
    shape, dtype = _npy_header(data, source)
    if dtype.kind not in "biuf":
        raise VolumeError(f"{source}: unsupported dtype {dtype}; expected numbers")
    dims = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if not (len(dims) == 3 or (len(dims) == 4 and dims[-1] == 3)):
        raise VolumeError(
            f"{source}: expected shape (D, H, W), (1, D, H, W) or (D, H, W, 3), got {shape}"
        )
    if limits is not None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        limits.check_declared(source, slices=dims[0], height=dims[1], width=dims[2],
                              nbytes=nbytes)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise VolumeError(f"{source}: not a readable .npy array ({err})") from err
    if not isinstance(arr, np.ndarray):
        raise VolumeError(f"{source}: expected one .npy array, got {type(arr).__name__}")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return {"array": np.ascontiguousarray(arr), "spacing": (1.0, 1.0, 1.0), "meta": {}}


_NRRD_CODECS = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def decode_nrrd(data: bytes, source: str, max_bytes: int, limits: Any = None,
                deadline: Any = None) -> dict[str, Any]:
    """Decode an attached-header NRRD (raw, gzip or bzip2 encoding; text via pynrrd).

    The header's sizes and type are checked against ``limits`` first; compressed data is
    inflated here with an output cap of the declared size (pynrrd would inflate it whole).
    """
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
    except VolumeError:
        raise
    except Exception as err:  # pynrrd raises NRRDError, ValueError, ...
        raise VolumeError(f"{source}: corrupt or truncated NRRD "
                          f"({type(err).__name__}: {err})") from err
    count = int(np.prod(sizes, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if limits is None and nbytes > max_bytes:  # no limits: the stored-size cap bounds it
        raise VolumeError(f"{source}: NRRD declares {nbytes} bytes, over the {max_bytes} cap")
    shape3 = squeeze_to_3d(tuple(sizes), source)
    affine = _nrrd_affine(header)
    if limits is not None:
        xform, _, _ = canonical_transform(affine)
        slices, height, width = declared_geometry(shape3, xform)
        limits.check_declared(source, slices=slices, height=height, width=width, nbytes=nbytes)
    data_xyz = _nrrd_voxels(data, fh, header, dtype, count, source, deadline)
    data_xyz = data_xyz.reshape(shape3, order="F")
    arr, spacing, codes = to_canonical(data_xyz, affine)
    arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return {"array": arr, "spacing": spacing, "meta": {"orientation_in": codes}}


def _nrrd_voxels(data: bytes, fh: io.BytesIO, header: dict[str, Any], dtype: np.dtype,
                 count: int, source: str, deadline: Any) -> np.ndarray:
    """The voxel values (flat, Fortran order) after the header at ``fh``'s position."""
    import nrrd

    encoding = str(header.get("encoding", "raw")).lower()
    nbytes = count * dtype.itemsize
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)) or 0)
    line_skip = int(header.get("line skip", header.get("lineskip", 0)) or 0)
    if encoding in _NRRD_CODECS and not line_skip and byte_skip >= 0:
        raw = memoryview(inflate_capped(data[fh.tell():], _NRRD_CODECS[encoding],
                                        nbytes + byte_skip, source, deadline))[byte_skip:]
    elif encoding == "raw" and not line_skip:
        raw = data[fh.tell():]
        raw = raw[-nbytes:] if byte_skip == -1 else raw[byte_skip:]
    else:  # text/hex encodings and line skips: pynrrd (its output size was checked above)
        try:
            return nrrd.read_data(header, fh, None, index_order="F").reshape(-1, order="F")
        except Exception as err:
            raise VolumeError(
                f"{source}: corrupt or truncated NRRD ({type(err).__name__}: {err})") from err
    if len(raw) < nbytes:
        raise VolumeError(f"{source}: truncated NRRD: header declares {nbytes} data bytes, "
                          f"file holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, count=count)


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


def decode_image(data: bytes, source: str, limits: Any = None) -> np.ndarray:
    """One 2-D slice image -> (H, W) (grey, 8/16-bit) or (H, W, 3) uint8.

    The image's declared size is read lazily (no pixels decoded) and checked against
    ``limits.max_slice_pixels`` first. Pillow's own decompression-bomb check is made an error
    explicitly (its default is only a warning below twice ``Image.MAX_IMAGE_PIXELS``).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if limits is not None:
                    bands = len(img.getbands())
                    limits.check_declared(source, slices=1, height=height, width=width,
                                          nbytes=height * width * max(bands, 1))
                img.load()
                if img.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                    arr = np.asarray(img)
                elif img.mode == "1":
                    arr = np.asarray(img.convert("L"))
                else:
                    arr = np.asarray(img.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise VolumeLimitError(f"{source}: image too large ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, VolumeError):
            raise
        raise VolumeError(f"{source}: corrupt or unreadable image ({err})") from err
    if arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        arr = arr[..., 0]
    return arr
