"""NIfTI-1/2 decoding, fast: isal gzip, no float64, one pass into the canonical array.

For ``.nii.gz`` whose slice axis stays the slowest one after reorientation (axial data, the
usual case), the gzip stream is inflated by a worker thread (isal, which releases the GIL)
while this thread moves each finished run of slices into the output with its flips:
decompression and reorientation overlap, and the decompressed bytes are never held whole. Other
layouts inflate in one call and reorient with one copy.
Orientation and value rules: :mod:`pipeline.io.volume_decoders`.
"""

from __future__ import annotations

import io
import queue
import threading
import zlib
from typing import Any

import numpy as np

from pipeline.io.limits import VolumeLimitError, inflate_capped
from pipeline.io.volume_decoders import (
    GZIP_MAGIC,
    VolumeError,
    apply_canonical,
    canonical_transform,
    declared_geometry,
    gunzip_head,
    scale_values,
    squeeze_to_3d,
    zlib_impl,
)

_INPUT_STEP = 1 << 20  # compressed bytes per inflate call in the worker
# Inflated bytes per call at most: a bomb's 1 MiB of input could otherwise inflate to 1 GiB in
# one call (the consumer stops at the declared size; this bounds what is made before it does).
_OUTPUT_STEP = 8 << 20
_TRAILING_SLACK = 1 << 20  # inflated bytes tolerated after the declared voxels


def decode_nifti(data: bytes, source: str, max_bytes: int, limits: Any = None,
                 deadline: Any = None) -> dict[str, Any]:
    """Decode NIfTI-1/2 (``.nii`` or gzip ``.nii.gz``) bytes to a canonical (D, H, W) array.

    Args:
        data, source: the file's bytes and its name for messages.
        max_bytes: cap on the declared voxel bytes when no ``limits`` are given.
        limits: a ``pipeline.io.limits.DecodeLimits``, checked on the header before inflating.
        deadline: a ``pipeline.io.limits.Deadline`` checked while inflating.

    Raises:
        VolumeError: not NIfTI, corrupt or truncated, unsupported dtype, not 3-D, over
            ``max_bytes`` or ``limits`` (checked on the header before inflating).
    """
    compressed = data[:2] == GZIP_MAGIC
    head = gunzip_head(data, 544, source) if compressed else data[:544]
    header = _nifti_header(head, source, compressed)
    shape = tuple(int(s) for s in header.get_data_shape())
    try:
        dtype = header.get_data_dtype()
    except Exception as err:  # unknown datatype code
        raise VolumeError(f"{source}: unsupported NIfTI datatype ({err})") from err
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = int(header.get_data_offset())
    if limits is not None:
        limits.check_bytes(source, nbytes)
    elif nbytes > max_bytes:  # no limits given: the stored-size cap bounds the voxels too
        raise VolumeError(
            f"{source}: NIfTI header declares {nbytes} bytes of voxels, over the {max_bytes} cap"
        )
    shape3 = squeeze_to_3d(shape, source)
    xform, spacing, codes = canonical_transform(header.get_best_affine())
    if limits is not None:
        slices, height, width = declared_geometry(shape3, xform)
        limits.check_declared(source, slices=slices, height=height, width=width, nbytes=nbytes)
    native = dtype.newbyteorder("=")
    if compressed and int(xform[2][0]) == 2:  # voxel axis k stays the slice axis
        arr = _inflate_slices(data, offset, shape3, dtype, xform, source, deadline,
                              capped=limits is not None)
    else:
        # the declared voxels (checked above) plus slack for trailing bytes: a stream that
        # inflates further is cut at the cap, whatever the header said
        raw = inflate_capped(data, "gzip", offset + nbytes + _TRAILING_SLACK, source, deadline) \
            if compressed else data
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


def _inflate_chunks(data: bytes, chunks: queue.Queue, stop: threading.Event,
                    max_out: int = _OUTPUT_STEP) -> None:
    """Worker: inflate gzip member after member, queueing output chunks of at most ``max_out``
    bytes (0: unbounded); then None (done), or the exception (EOFError when the stream ends
    early)."""
    def put(item: object) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        view = memoryview(data)
        start = 0
        while start < len(view) and not stop.is_set():  # one gzip member per turn
            inflater = zlib_impl.decompressobj(31)
            pos = start
            while not inflater.eof and not stop.is_set():
                if inflater.unconsumed_tail:  # output was capped: continue on the same input
                    out = inflater.decompress(inflater.unconsumed_tail, max_out)
                elif pos < len(view):
                    out = inflater.decompress(view[pos:pos + _INPUT_STEP], max_out)
                    pos = min(pos + _INPUT_STEP, len(view))
                else:
                    out = inflater.decompress(b"", max_out)  # drain what zlib holds
                    if not out:
                        raise EOFError("compressed stream ended before the end-of-stream marker")
                if out:
                    put(out)
            start = pos - len(inflater.unused_data)
            if bytes(view[start:start + 2]) != GZIP_MAGIC:
                break  # trailing padding, or bytes that start no further member
        put(None)
    except Exception as err:  # handed to the consuming thread
        put(err)


def _inflate_slices(
    data: bytes, offset: int, shape3: tuple[int, ...], dtype: np.dtype, xform: np.ndarray,
    source: str, deadline: Any = None, capped: bool = True,
) -> np.ndarray:
    """Inflate in a worker thread; place slices (voxel axis k) as the chunks arrive.

    ``capped``: bounded output per inflate call, and a stream that goes on past the declared
    voxels is refused (off only for "no limits", e.g. the benchmark's baseline).

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
    worker = threading.Thread(target=_inflate_chunks, daemon=True,
                              args=(data, chunks, stop, _OUTPUT_STEP if capped else 0))
    worker.start()
    skip, k, carry = offset, 0, bytearray()
    try:
        while k < nz:
            item = chunks.get()
            if item is None:
                raise _truncated(source, nz * plane, offset, k * plane + len(carry))
            if isinstance(item, BaseException):
                raise item
            if deadline is not None:
                deadline.check(source)
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
        if capped:
            _refuse_trailing(chunks, len(view), source)
    except EOFError as err:
        raise VolumeError(f"{source}: truncated gzip stream ({err})") from err
    except (OSError, zlib.error, zlib_impl.error) as err:
        raise VolumeError(f"{source}: corrupt gzip stream ({err})") from err
    finally:
        stop.set()
        worker.join(timeout=5)
    return out


def _refuse_trailing(chunks: queue.Queue, extra: int, source: str) -> None:
    """After the declared voxels: refuse a stream that goes on for more than the slack (a bomb
    behind a small header), as the inflate-whole path's cap does; errors past the voxels (a
    damaged trailer) are ignored as before."""
    while extra <= _TRAILING_SLACK:
        item = chunks.get()
        if item is None or isinstance(item, BaseException):
            return
        extra += len(item)
    raise VolumeLimitError(f"{source}: gzip stream inflates to more than the declared voxels "
                           f"plus the limit of {_TRAILING_SLACK} trailing bytes")


def _nifti_header(head: bytes, source: str, compressed: bool = False) -> Any:
    import nibabel as nib

    kind = "gzip-compressed data" if compressed else "file"
    if len(head) < 4:
        raise VolumeError(f"{source}: not a NIfTI file ({kind} of {len(head)} bytes)")
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size == 348:
            klass, magic, at = nib.Nifti1Header, (b"n+1\0", b"ni1\0"), 344
            break
        if size == 540:
            klass, magic, at = nib.Nifti2Header, (b"n+2\0", b"ni2\0"), 4
            break
    else:
        hint = "" if compressed else " and not gzip-compressed"
        raise VolumeError(f"{source}: not a NIfTI file (header size field is not 348 or 540{hint})")
    if len(head) < 348:
        raise VolumeError(f"{source}: truncated NIfTI: only {len(head)} header bytes")
    if head[at:at + 4] not in magic:
        raise VolumeError(f"{source}: not a NIfTI file (no 'n+1'/'n+2' magic in the header)")
    try:
        return klass.from_fileobj(io.BytesIO(head), check=False)
    except Exception as err:
        raise VolumeError(f"{source}: corrupt NIfTI header ({err})") from err
