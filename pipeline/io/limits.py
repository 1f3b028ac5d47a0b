"""Decoding limits: one object, checked against declared sizes before anything is allocated.

:class:`DecodeLimits` bounds what decoding one volume may produce: decoded bytes, slices, pixels
per slice, and wall time. Every decoder reads the sizes a file declares (NIfTI dims + datatype,
NRRD sizes + type, DICOM Rows/Columns/NumberOfFrames, image dimensions, the ``.npy`` header, a
zip member's size) and calls :meth:`DecodeLimits.check_declared` before allocating; gzip, bzip2
and zip are inflated through :func:`inflate_capped`, which stops at the cap whatever the header
claimed. The same object is configured for the evaluation job (``run.limits``) and the HTTP
service (``limits``), and is passed down to ``pipeline.io.volumes``.

Time: a :class:`Deadline` is checked between inflate chunks, files and slices; one library
call (a single pydicom or PIL decode) is not interruptible, but its size was checked first.
"""

from __future__ import annotations

import bz2
import gzip
import time
import zlib
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

try:  # isal's igzip decodes gzip 2-3x faster than zlib; fall back when it is missing
    from isal import igzip as gzip_impl
    from isal import isal_zlib as zlib_impl
except ImportError:  # pragma: no cover - isal is a declared dependency
    gzip_impl = gzip  # type: ignore[assignment]
    zlib_impl = zlib  # type: ignore[assignment]

GiB = 1024**3
_CHUNK = 1 << 20  # bytes of compressed input (or of output) per inflate step
_MAGIC = {"gzip": b"\x1f\x8b", "bzip2": b"BZh"}


class VolumeError(ValueError):
    """A volume could not be read: the message names the source and what is wrong."""


class VolumeLimitError(VolumeError):
    """A volume (declared or decoded) exceeds a :class:`DecodeLimits` limit (HTTP 413)."""


class DecodeTimeoutError(VolumeLimitError):
    """Decoding took longer than ``DecodeLimits.max_decode_s``."""


class DecodeLimits(BaseModel):
    """What decoding one volume may produce. The defaults (1 GiB, 1024 slices, 1024 x 1024
    pixels per slice, 60 s) pass a 600-slice 512 x 512 CT in int16 (300 MiB) or float32
    (600 MiB)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_decoded_bytes: int = Field(GiB, ge=1024, description="decoded voxel bytes of one volume "
                                   "(also the cap of every gzip/bzip2/zip inflation)")
    max_slices: int = Field(1024, ge=1, description="slices (depth) of one volume")
    max_slice_pixels: int = Field(1024 * 1024, ge=64, description="pixels (height x width) of "
                                  "one slice")
    max_decode_s: float = Field(60.0, gt=0, description="wall-time budget of decoding one volume")

    @classmethod
    def unlimited(cls) -> DecodeLimits:
        """No practical limit (benchmarks' "caps off"; trusted local data)."""
        return cls.model_construct(max_decoded_bytes=1 << 62, max_slices=1 << 40,
                                   max_slice_pixels=1 << 40, max_decode_s=1e12)

    @property
    def is_unlimited(self) -> bool:
        """True for :meth:`unlimited`: decoders then skip every check (a baseline to measure
        the checks against)."""
        return self.max_decoded_bytes >= 1 << 62 and self.max_decode_s >= 1e12

    def deadline(self) -> Deadline:
        """A deadline ``max_decode_s`` from now."""
        return Deadline(self.max_decode_s)

    def check_declared(self, source: str, *, slices: int, height: int, width: int,
                       nbytes: int, what: str = "declares") -> None:
        """Refuse a volume whose declared geometry exceeds a limit.

        Args:
            source: name used in the message.
            slices, height, width: declared depth and slice size.
            nbytes: declared decoded bytes (all channels).
            what: verb of the message ("declares", "holds").

        Raises:
            VolumeLimitError: naming the value and the limit.
        """
        if slices > self.max_slices:
            raise VolumeLimitError(f"{source}: {what} {slices} slices, over the limit of "
                                   f"{self.max_slices} slices")
        if height * width > self.max_slice_pixels:
            raise VolumeLimitError(f"{source}: {what} slices of {height} x {width} pixels, over "
                                   f"the limit of {self.max_slice_pixels} pixels per slice")
        self.check_bytes(source, nbytes, what)

    def check_bytes(self, source: str, nbytes: int, what: str = "declares") -> None:
        """Refuse more than ``max_decoded_bytes`` decoded bytes (VolumeLimitError)."""
        if nbytes > self.max_decoded_bytes:
            raise VolumeLimitError(f"{source}: {what} {nbytes} decoded bytes, over the limit of "
                                   f"{self.max_decoded_bytes} bytes")


class Deadline:
    """A wall-clock budget; :meth:`check` raises :class:`DecodeTimeoutError` once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self, source: str) -> None:
        """Raise DecodeTimeoutError when the budget is spent."""
        if time.monotonic() > self.end:
            raise DecodeTimeoutError(f"{source}: decoding took longer than the budget of "
                                     f"{self.seconds:g} s")


def as_limits(limits: DecodeLimits | dict | None) -> DecodeLimits:
    """A DecodeLimits from itself, a dict of its fields, or None (the defaults)."""
    if limits is None:
        return DecodeLimits()
    if isinstance(limits, dict):
        return DecodeLimits.model_validate(limits)
    return limits


def inflate_capped(data: bytes, codec: str, cap: int, source: str,
                   deadline: Deadline | None = None) -> bytearray:
    """Inflate a whole gzip (all members) or bzip2 stream, never producing more than ``cap``.

    Output is requested in bounded steps (``max_length``), so a bomb costs at most ``cap``
    bytes of memory and stops there, whatever its header said.

    Raises:
        VolumeLimitError: the stream inflates to more than ``cap`` bytes (or the deadline).
        VolumeError: corrupt or truncated stream.
    """
    out = bytearray()
    view = memoryview(data)
    start = 0
    try:
        while start < len(view):  # one compressed stream (gzip member, bzip2 stream) per turn
            dec = _Inflater(codec)
            pos = start
            while not dec.eof:
                if dec.needs_input and pos < len(view):
                    dec.feed(view[pos:pos + _CHUNK])
                    pos = min(pos + _CHUNK, len(view))
                piece = dec.step(cap - len(out) + 1)
                if not piece and not dec.eof and dec.needs_input and pos >= len(view):
                    raise VolumeError(f"{source}: truncated {codec} stream")
                out += piece
                if len(out) > cap:
                    raise VolumeLimitError(f"{source}: {codec} stream inflates to more than "
                                           f"the limit of {cap} bytes")
                if deadline is not None:
                    deadline.check(source)
            start = pos - len(dec.unused_data)
            if bytes(view[start:start + len(_MAGIC[codec])]) != _MAGIC[codec]:
                break  # trailing padding (zeros) or bytes that start no further stream
    except (OSError, ValueError, EOFError, zlib.error, zlib_impl.error) as err:
        if isinstance(err, VolumeError):
            raise
        raise VolumeError(f"{source}: corrupt {codec} stream ({err})") from err
    return out  # not copied into bytes: at the cap that copy would double the peak


class _Inflater:
    """gzip (isal) and bzip2 decompressors behind one bounded-output interface."""

    def __init__(self, codec: str) -> None:
        if codec not in ("gzip", "bzip2"):
            raise ValueError(f"unknown codec {codec!r}; valid: gzip, bzip2")
        self.codec = codec
        self.dec = zlib_impl.decompressobj(31) if codec == "gzip" else bz2.BZ2Decompressor()
        self.pending = b""

    @property
    def eof(self) -> bool:
        return bool(self.dec.eof)

    @property
    def needs_input(self) -> bool:
        if self.codec == "gzip":
            return not self.pending
        return self.dec.needs_input and not self.pending

    @property
    def unused_data(self) -> bytes:
        return bytes(self.dec.unused_data)

    def feed(self, chunk: bytes) -> None:
        self.pending = chunk

    def step(self, max_length: int) -> bytes:
        """At most ``max_length`` bytes of output from the pending input (and internal state)."""
        if self.codec == "gzip":
            piece = self.dec.decompress(self.pending, max_length)
            self.pending = self.dec.unconsumed_tail
            return piece
        piece = self.dec.decompress(self.pending, max_length=max_length)
        self.pending = b""
        return piece


def read_capped(stream: IO[bytes], cap: int, source: str,
                deadline: Deadline | None = None) -> bytes:
    """Read a file-like object (a zip member) to its end, refusing more than ``cap`` bytes."""
    out = bytearray()
    while True:
        piece = stream.read(min(_CHUNK, cap - len(out) + 1))
        if not piece:
            return bytes(out)
        out += piece
        if len(out) > cap:
            raise VolumeLimitError(f"{source}: inflates to more than the limit of {cap} bytes")
        if deadline is not None:
            deadline.check(source)
