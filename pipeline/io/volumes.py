"""Load 3-D medical volumes from any URI (or uploaded bytes) as (D, H, W) axial slices.

Formats (:data:`FORMATS`): NIfTI, NumPy, DICOM series, slice-image folders (the Hulu layout)
and NRRD. Geometry-carrying formats are reoriented to one canonical order, described in
:mod:`pipeline.io.volume_decoders`: ``array[z, y, x]``, z inferior -> superior, rows anterior ->
posterior, columns patient right -> left (radiological display). Values keep their stored
dtype after rescaling (int16 HU stays int16). Every bad input raises :class:`VolumeError`
naming the file and the problem. CT windowing and MedGemma's three-window packing are
re-exported from :mod:`pruning.ops.windowing`.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.io import storage as st
from pipeline.io.dicom import (
    DICOM_SUFFIXES,
    decode_dicom_file,
    decode_dicom_series,
    looks_like_dicom,
    rescaled_pixels,
)
from pipeline.io.limits import (
    Deadline,
    DecodeLimits,
    VolumeLimitError,
    as_limits,
    read_capped,
)
from pipeline.io.nifti import decode_nifti
from pipeline.io.storage import StorageOptions
from pipeline.io.volume_decoders import (
    IMAGE_SUFFIXES,
    VolumeError,
    decode_image,
    decode_npy,
    decode_nrrd,
)

FORMATS: dict[str, str] = {
    "nifti": ".nii or .nii.gz file (NIfTI-1/2), reoriented to canonical axial",
    "npy": ".npy array, (D, H, W), (1, D, H, W) or (D, H, W, 3), taken as is",
    "dicom": "folder of one DICOM series ordered by ImagePositionPatient (or one .dcm file)",
    "slices": ("folder of 2-D slice images (.png .jpg .jpeg .bmp .tif, also .dcm) in "
               "file-name order"),
    "nrrd": ".nrrd file with attached header, reoriented to canonical axial",
}
_ALIASES = {
    "nii": "nifti", "nii.gz": "nifti", "nifti1": "nifti", "numpy": "npy", "dcm": "dicom",
    "images": "slices", "png": "slices", "jpg": "slices", "slice_folder": "slices",
}
DEFAULT_MAX_BYTES = 2 * 1024**3
SliceOrder = Literal["lexicographic", "natural"]


@dataclass
class Volume:
    """A decoded volume.

    Attributes:
        array: (D, H, W) axial slices, or (D, H, W, 3) RGB; stored dtype kept (HU for CT).
        spacing: voxel size (z, y, x) in mm (1.0 where the format carries none).
        modality: "CT" (values in HU), "MR", or "OT" (other: display intensities / unknown).
        source: where it came from (URI or the upload's name).
        format: one of :data:`FORMATS`.
        meta: non-identifying details (original orientation, file count, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    source: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`."""
        return tuple(self.array.shape)


def normalise_format(fmt: str) -> str:
    """Canonical format name for a name or alias; raises :class:`VolumeError` listing valid ones."""
    key = fmt.strip().lower().lstrip(".")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise VolumeError(f"unknown volume format {fmt!r}; valid: {', '.join(FORMATS)}")
    return key


def format_from_name(name: str) -> str | None:
    """Format implied by a file name's suffix, or None (folders and unknown suffixes)."""
    low = name.lower().rstrip("/")
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if low.endswith(".npy"):
        return "npy"
    if low.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if low.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def detect_format(uri: str, storage: StorageOptions | None = None) -> str:
    """Detect a volume's format from its suffix, or for a folder from the files inside.

    Raises:
        VolumeError: unknown suffix, or a folder with neither images nor DICOM files.
    """
    fmt = format_from_name(uri)
    if fmt is not None:
        return fmt
    try:
        if not st.is_dir(uri, storage):
            if st.exists(uri, storage):
                raise VolumeError(
                    f"{uri}: unknown volume format (file suffix); valid: {', '.join(FORMATS)} "
                    "(.nii, .nii.gz, .npy, .nrrd, .dcm, or a folder of .dcm or slice images)"
                )
            raise VolumeError(f"{uri}: not found")
        names = st.list_uri(uri, storage)
    except OSError as err:
        raise VolumeError(f"{uri}: cannot list ({type(err).__name__}: {err})") from err
    if not names:
        raise VolumeError(f"{uri}: empty folder (zero slices)")
    if any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
        return "slices"
    if any(n.lower().endswith(DICOM_SUFFIXES) for n in names):
        return "dicom"
    raise VolumeError(
        f"{uri}: folder holds no slice images ({', '.join(IMAGE_SUFFIXES)}) or DICOM files; "
        f"valid formats: {', '.join(FORMATS)}"
    )


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sort_slice_names(names: list[str], order: SliceOrder = "lexicographic") -> list[str]:
    """Order slice files: ``sorted()`` of names (the paper's loader: ``10.png`` < ``2.png``)
    or ``natural`` numeric order (``2.png`` < ``10.png``)."""
    if order == "lexicographic":
        return sorted(names, key=st.basename)
    if order == "natural":
        return sorted(names, key=lambda n: _natural_key(st.basename(n)))
    raise VolumeError(f"unknown slice order {order!r}; valid: lexicographic, natural")


def load_volume(
    uri: str,
    *,
    format: str | None = None,
    storage: StorageOptions | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    slice_order: SliceOrder = "lexicographic",
    modality: str | None = None,
    limits: DecodeLimits | dict | None = None,
) -> Volume:
    """Load a volume from a local path, ``file://`` or ``s3://`` URI.

    Args:
        uri: a file (NIfTI, NPY, NRRD, single DICOM), a folder (DICOM series, slice images)
            or a ``.zip`` of such a folder.
        format: one of :data:`FORMATS` (or an alias); None detects it from the URI.
        storage: object-store options for ``s3://``.
        max_bytes: cap on the stored size (file, or sum over a folder or a zip's members).
        slice_order: order of slice-image files: "lexicographic" (default, as the paper) or
            "natural".
        modality: override the modality; None reads DICOM's tag or guesses "CT" from HU-like
            values (minimum below -200), else "OT".
        limits: decoded bytes, slices, pixels per slice and decoding time
            (:class:`pipeline.io.limits.DecodeLimits`; None: its defaults), checked on the
            sizes each format declares before anything is allocated.

    Raises:
        VolumeError: missing, corrupt or truncated input, unknown format, wrong dimensionality,
            NaN/inf values, zero slices, differing slice sizes, a DICOM series without positions,
            or input over ``max_bytes``; :class:`VolumeLimitError` (a VolumeError) when over
            ``limits``. A storage failure is a VolumeError chained to the storage's exception,
            or that exception itself (botocore's); ``pipeline.io.storage.is_transient`` tells
            outages from bad files.
    """
    limits = as_limits(limits)
    if uri.lower().endswith(".zip"):
        data = _read_file(uri, storage, max_bytes)
        return decode_volume(data, format or "zip", source=uri, max_bytes=max_bytes,
                             slice_order=slice_order, modality=modality, limits=limits)
    fmt = normalise_format(format) if format else detect_format(uri, storage)
    deadline = limits.deadline()
    if fmt in ("dicom", "slices") and format_from_name(uri) is None:
        files = _read_folder(uri, fmt, storage, max_bytes, limits)
        decoded = _decode_files(files, fmt, uri, slice_order, limits, deadline)
    else:
        data = _read_file(uri, storage, max_bytes)
        decoded = _decode_single(data, fmt, uri, max_bytes, limits, deadline)
    return _finish(decoded, fmt, uri, limits, modality)


def decode_volume(
    data: bytes,
    format: str,
    *,
    source: str = "<bytes>",
    max_bytes: int = DEFAULT_MAX_BYTES,
    slice_order: SliceOrder = "lexicographic",
    modality: str | None = None,
    limits: DecodeLimits | dict | None = None,
) -> Volume:
    """Decode an uploaded volume held in memory (the HTTP service's path).

    Args:
        data: the file's bytes. For "dicom" and "slices" a ``.zip`` of the folder is accepted
            (a single ``.dcm`` file too for "dicom").
        format: one of :data:`FORMATS`, an alias, or a file name whose suffix gives it
            (``scan.nii.gz``; ``*.zip`` means a zipped DICOM or image folder).
        source: name used in error messages.
        max_bytes, slice_order, modality, limits: as in :func:`load_volume`.

    Raises:
        VolumeError: as :func:`load_volume`.
    """
    limits = as_limits(limits)
    deadline = limits.deadline()
    if len(data) > max_bytes:
        raise VolumeError(f"{source}: {len(data)} bytes, over the {max_bytes} cap")
    is_zip = data[:4] == b"PK\x03\x04"
    if format.lower().endswith(".zip") or format.lower() == "zip":
        fmt = None
    else:
        fmt = format_from_name(format) if "." in format.strip(".") else None
        fmt = fmt or normalise_format(format)
    if is_zip and fmt in (None, "dicom", "slices"):
        files = _unzip(data, source, max_bytes, limits, deadline)
        if fmt is None:
            fmt = "slices" if any(n.lower().endswith(IMAGE_SUFFIXES) for n, _ in files) else "dicom"
        decoded = _decode_files(files, fmt, source, slice_order, limits, deadline)
    elif fmt is None:
        raise VolumeError(f"{source}: not a zip archive although the format says zip")
    elif fmt == "slices":
        decoded = {"array": decode_image(data, source, limits)[None], "spacing": (1.0, 1.0, 1.0)}
    else:
        decoded = _decode_single(data, fmt, source, max_bytes, limits, deadline)
    return _finish(decoded, fmt, source, limits, modality)


def _read_file(uri: str, storage: StorageOptions | None, max_bytes: int) -> bytes:
    try:
        size = st.file_size(uri, storage)
        if size > max_bytes:
            raise VolumeError(f"{uri}: file is {size} bytes, over the {max_bytes} cap")
        return st.read_bytes(uri, storage)
    except VolumeError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as err:
        raise VolumeError(f"{uri}: cannot read ({type(err).__name__}: {err})") from err


def _read_folder(
    uri: str, fmt: str, storage: StorageOptions | None, max_bytes: int, limits: DecodeLimits
) -> list[tuple[str, bytes]]:
    suffixes = DICOM_SUFFIXES if fmt == "dicom" else IMAGE_SUFFIXES + (".dcm",)
    try:
        listed = st.list_with_sizes(uri, storage)
    except (FileNotFoundError, NotADirectoryError, OSError) as err:
        raise VolumeError(f"{uri}: cannot list folder ({type(err).__name__}: {err})") from err
    chosen = [(u, s) for u, s in listed if u.lower().endswith(suffixes)]
    if fmt == "dicom" and not chosen:  # series often come without a suffix
        chosen = [(u, s) for u, s in listed if not st.basename(u).startswith(".")]
    if not chosen:
        raise VolumeError(f"{uri}: folder holds no {fmt} files ({', '.join(suffixes)}): "
                          "zero slices")
    if len(chosen) > limits.max_slices:
        raise VolumeLimitError(f"{uri}: folder holds {len(chosen)} files, over the limit of "
                               f"{limits.max_slices} slices")
    total = sum(size for _, size in chosen)
    if total > max_bytes:
        raise VolumeError(f"{uri}: folder holds {total} bytes, over the {max_bytes} cap")
    uris = [u for u, _ in chosen]
    try:
        return list(zip(uris, st.read_many(uris, storage), strict=True))
    except (FileNotFoundError, PermissionError, OSError) as err:
        raise VolumeError(f"{uri}: cannot read folder ({type(err).__name__}: {err})") from err


def _unzip(data: bytes, source: str, max_bytes: int, limits: DecodeLimits,
           deadline: Deadline) -> list[tuple[str, bytes]]:
    """A zip's files, refused on the members' declared count and sizes before inflating, and
    inflated with a cap on the actual output (a member may lie about its size)."""
    cap = min(max_bytes, limits.max_decoded_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and "__MACOSX" not in i.filename
                     and not st.basename(i.filename).startswith(".")]
            if len(infos) > limits.max_slices:
                raise VolumeLimitError(f"{source}: zip holds {len(infos)} files, over the limit "
                                       f"of {limits.max_slices} slices")
            total = sum(i.file_size for i in infos)
            if total > cap:
                raise VolumeLimitError(f"{source}: zip unpacks to {total} bytes, over the limit "
                                       f"of {cap} bytes")
            files = []
            for info in infos:
                with zf.open(info) as member:
                    name = f"{source}/{info.filename}"
                    files.append((name, read_capped(member, cap - _total_read(files), name,
                                                    deadline)))
            return files
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as err:
        raise VolumeError(f"{source}: corrupt or truncated zip ({err})") from err


def _total_read(files: list[tuple[str, bytes]]) -> int:
    """Bytes held by ``(name, bytes)`` pairs."""
    return sum(len(d) for _, d in files)


def _decode_single(data: bytes, fmt: str, source: str, max_bytes: int, limits: DecodeLimits,
                   deadline: Deadline) -> dict[str, Any]:
    if not data:
        raise VolumeError(f"{source}: empty file")
    if fmt == "nifti":
        if limits.is_unlimited:  # no checks at all (the benchmark's baseline)
            return decode_nifti(data, source, 1 << 62)
        return decode_nifti(data, source, max_bytes, limits, deadline)
    if fmt == "npy":
        return decode_npy(data, source, limits)
    if fmt == "nrrd":
        return decode_nrrd(data, source, max_bytes, limits, deadline)
    if fmt == "dicom":
        return decode_dicom_file(data, source, limits)
    raise VolumeError(f"{source}: format {fmt!r} needs a folder (or a zip of one)")


def _decode_files(
    files: list[tuple[str, bytes]], fmt: str, source: str, slice_order: SliceOrder,
    limits: DecodeLimits, deadline: Deadline,
) -> dict[str, Any]:
    if fmt == "dicom":
        return decode_dicom_series([(n, d) for n, d in files if d], source, limits, deadline)
    names = sort_slice_names([n for n, _ in files], slice_order)
    by_name = dict(files)
    if not names:
        raise VolumeError(f"{source}: no slice images (zero slices)")
    if len(names) > limits.max_slices:
        raise VolumeLimitError(f"{source}: {len(names)} slice files, over the limit of "
                               f"{limits.max_slices} slices")
    out: np.ndarray | None = None
    for k, name in enumerate(names):
        deadline.check(source)
        data = by_name[name]
        if name.lower().endswith(DICOM_SUFFIXES) or looks_like_dicom(data):
            image = rescaled_pixels(data, name, limits)
        else:
            image = decode_image(data, name, limits)
        if out is None:  # every slice must match the first: the whole stack is known now
            limits.check_bytes(source, image.nbytes * len(names), "would decode to")
            out = np.empty((len(names), *image.shape), dtype=image.dtype)
            first = names[0]
        elif image.shape != out.shape[1:]:
            raise VolumeError(
                f"{source}: slices of different sizes: {first} is {out.shape[1:]}, "
                f"{name} is {image.shape}"
            )
        if image.dtype != out.dtype:  # e.g. rescaled DICOM slices of different integer ranges
            out = out.astype(np.result_type(out.dtype, image.dtype))
        out[k] = image
    return {"array": out, "spacing": (1.0, 1.0, 1.0),
            "meta": {"slice_files": len(names), "slice_order": slice_order}}


def guess_modality(array: np.ndarray) -> str:
    """"CT" when values look like Hounsfield units (minimum below -200), else "OT".

    Looks at every 4th row and column of every slice (air surrounds the body in any CT), so
    the guess costs a small fraction of a full pass.
    """
    if array.dtype == np.uint8 or array.size == 0:
        return "OT"
    return "CT" if float(array[:, ::4, ::4].min()) < -200 else "OT"


def _finish(
    decoded: dict[str, Any], fmt: str, source: str, limits: DecodeLimits, modality: str | None
) -> Volume:
    arr = decoded["array"]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise VolumeError(f"{source}: expected (D, H, W) or (D, H, W, 3), got shape {arr.shape}")
    if min(arr.shape) == 0:
        raise VolumeError(f"{source}: empty volume, shape {arr.shape} (zero slices)")
    limits.check_declared(source, slices=arr.shape[0], height=arr.shape[1], width=arr.shape[2],
                          nbytes=arr.nbytes, what="decoded to")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise VolumeError(f"{source}: {bad} voxels are NaN or infinite")
    spacing = tuple(round(float(s), 6) for s in decoded.get("spacing", (1.0, 1.0, 1.0)))
    chosen = modality or decoded.get("modality") or guess_modality(arr)
    meta = dict(decoded.get("meta", {}))
    return Volume(arr, spacing, chosen, source, fmt, meta)  # type: ignore[arg-type]
