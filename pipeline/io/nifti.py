"""NIfTI-1/2 decoding, fast: isal gzip, no float64, one pass into the canonical array.

For ``.nii.gz`` whose slice axis stays the slowest one after reorientation (axial data, the
usual case), the gzip stream is inflated by a worker thread (isal, which releases the GIL)
while this thread moves each finished run of slices into the output with its flips:
decompression and reorientation overlap, and the decompressed bytes are never held whole. Other layouts inflate in one call and reorient with one copy.
Orientation and value rules: :mod:`pipeline.io.volume_decoders`.
"""

from __future__ import annotations

import io
import queue
import threading
import zlib
from typing import Any

import numpy as np

from pipeline.io.volume_decoders import (
    GZIP_MAGIC,
    VolumeError,
    apply_canonical,
    canonical_transform,
    gunzip,
    gunzip_head,
    scale_values,
    squeeze_to_3d,
    zlib_impl,
)

_INPUT_STEP = 1 << 20  # compressed bytes per inflate call in the worker


def decode_nifti(data: bytes, source: str, max_bytes: int) -> dict[str, Any]:
    """Decode NIfTI-1/2 (``.nii`` or gzip ``.nii.gz``) bytes to a canonical (D, H, W) array.

    Raises:
        VolumeError: not NIfTI, corrupt or truncated, unsupported dtype, not 3-D, over
            ``max_bytes`` (checked on the header before inflating).
    """
    compressed = data[:2] == GZIP_MAGIC
    head = gunzip_head(data, 544, source) if compressed else data[:544]
    header = _nifti_header(head, source)
    shape = tuple(int(s) for s in header.get_data_shape())
    try:
        dtype = header.get_data_dtype()
    except Exception as err:  # unknown datatype code
        raise VolumeError(f"{source}: unsupported NIfTI datatype ({err})") from err
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = int(header.get_data_offset())
    if nbytes > max_bytes:
        raise VolumeError(
            f"{source}: NIfTI header declares {nbytes} bytes of voxels, over the {max_bytes} cap"
        )
    shape3 = squeeze_to_3d(shape, source)
    xform, spacing, codes = canonical_transform(header.get_best_affine())
    native = dtype.newbyteorder("=")
    if compressed and int(xform[2][0]) == 2:  # voxel axis k stays the slice axis
        arr = _inflate_slices(data, offset, shape3, dtype, xform, source)
    else:
        raw = gunzip(data, source, max_bytes + offset + (1 << 20)) if compressed else data
        if len(raw) < offset + nbytes:
            raise _truncated(source, nbytes, offset, len(raw) - offset)
        voxels = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape3)), offset=offset)
        voxels = voxels.reshape(shape3, order="F")  # (x, y, z), zero-copy
        # exactly one copy: C-contiguous (z, y, x), native byte order, writable
        arr = np.array(apply_canonical(voxels, xform), dtype=native, order="C", copy=True)
    slope, inter = header.get_slope_inter()
    arr = scale_values(arr, slope, inter)
    return {"array": arr, "spacing": spacing, "meta": {"orientation_in": codes}}


def _truncated(source: str, nbytes: int, offset: int, got: int) -> VolumeError:
    return VolumeError(
        f"{source}: truncated NIfTI: header declares {nbytes} voxel bytes at offset {offset}, "
        f"file holds {max(got, 0)}"
    )


def _inflate_chunks(data: bytes, chunks: queue.Queue, stop: threading.Event) -> None:
    """Worker: inflate gzip member after member, queueing output chunks; then None (done),
    or the exception (EOFError when the stream ends early)."""
    def put(item: object) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        view = memoryview(data)
        while view:
            inflater = zlib_impl.decompressobj(31)
            pos = 0
            while pos < len(view) and not inflater.eof and not stop.is_set():
                out = inflater.decompress(view[pos:pos + _INPUT_STEP])
                pos += _INPUT_STEP
                if out:
                    put(out)
            if not inflater.eof:
                raise EOFError("compressed stream ended before the end-of-stream marker")
            rest = inflater.unused_data + bytes(view[pos:]) if pos < len(view) else inflater.unused_data
            view = memoryview(rest) if rest.strip(b"\0") else memoryview(b"")
        put(None)
    except Exception as err:  # handed to the consuming thread
        put(err)


def _inflate_slices(
    data: bytes, offset: int, shape3: tuple[int, ...], dtype: np.dtype, xform: np.ndarray,
    source: str,
) -> np.ndarray:
    """Inflate in a worker thread; place slices (voxel axis k) as the chunks arrive.

    Chunks are viewed in place (``np.frombuffer``); only a slice straddling two chunks is
    assembled in a small carry buffer, so each voxel is copied once, by its reorienting move.
    """
    nx, ny, nz = shape3
    plane = nx * ny * dtype.itemsize
    zflip = int(xform[2][1]) == -1
    in_plane = xform.copy()
    in_plane[2][1] = 1  # the flip along z is done by where slices land, not inside a block
    out_shape = apply_canonical(np.empty((nx, ny, 1), dtype=np.uint8), in_plane).shape[1:]
    out = np.empty((nz, *out_shape), dtype=dtype.newbyteorder("="))  # (D, H, W)

    def place(buffer: Any, k0: int, count: int) -> None:
        block = np.frombuffer(buffer, dtype=dtype, count=nx * ny * count)
        block = apply_canonical(block.reshape((nx, ny, count), order="F"), in_plane)
        if zflip:
            out[nz - k0 - count:nz - k0] = block[::-1]
        else:
            out[k0:k0 + count] = block

    chunks: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()
    worker = threading.Thread(target=_inflate_chunks, args=(data, chunks, stop), daemon=True)
    worker.start()
    skip, k, carry = offset, 0, bytearray()
    try:
        while k < nz:
            item = chunks.get()
            if item is None:
                raise _truncated(source, nz * plane, offset, k * plane + len(carry))
            if isinstance(item, BaseException):
                raise item
            view = memoryview(item)
            if skip:
                cut = min(skip, len(view))
                view, skip = view[cut:], skip - cut
            if carry:
                take = min(plane - len(carry), len(view))
                carry += view[:take]
                view = view[take:]
                if len(carry) == plane:
                    place(carry, k, 1)
                    k, carry = k + 1, bytearray()
            count = min(len(view) // plane, nz - k)
            if count:
                place(view, k, count)
                k += count
                view = view[count * plane:]
            if k < nz:
                carry += view
    except EOFError as err:
        raise VolumeError(f"{source}: truncated gzip stream ({err})") from err
    except (OSError, zlib.error, zlib_impl.error) as err:
        raise VolumeError(f"{source}: corrupt gzip stream ({err})") from err
    finally:
        stop.set()
        worker.join(timeout=5)
    return out


def _nifti_header(head: bytes, source: str) -> Any:
    import nibabel as nib

    if len(head) < 348:
        raise VolumeError(f"{source}: truncated NIfTI: only {len(head)} header bytes")
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size == 348:
            klass = nib.Nifti1Header
            break
        if size == 540:
            klass = nib.Nifti2Header
            break
    else:
        raise VolumeError(f"{source}: not a NIfTI file (header size field is not 348 or 540)")
    try:
        return klass.from_fileobj(io.BytesIO(head), check=False)
    except Exception as err:
        raise VolumeError(f"{source}: corrupt NIfTI header ({err})") from err
