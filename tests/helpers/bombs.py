"""Decompression bombs and lying headers, one builder per kind, small on the wire.

Each builder returns ``(bytes, format)`` ready for ``decode_volume`` or an HTTP upload. They
are built without ever holding the inflated payload: gzip and bzip2 bombs are many copies of
one compressed 1 MiB block of zeros (multi-member streams, which every gzip/bzip2 reader must
accept), PNGs are written from a small image by Pillow's encoder row by row.
"""

from __future__ import annotations

import bz2
import gzip
import io
import zipfile
import zlib
from functools import cache

import numpy as np

MiB = 1 << 20
# Every bomb declares or inflates to this much (over every limit the tests configure).
BOMB_BYTES = 512 * MiB


@cache
def _zeros_member(codec: str) -> bytes:
    zeros = bytes(MiB)
    return gzip.compress(zeros, 9) if codec == "gzip" else bz2.compress(zeros, 9)


def _zeros_stream(codec: str, nbytes: int) -> bytes:
    """A multi-member stream that inflates to ``nbytes`` zeros (multiple of 1 MiB)."""
    return _zeros_member(codec) * (nbytes // MiB)


def nifti_header(shape: tuple[int, ...], dtype: str = "int16") -> bytes:
    """A NIfTI-1 header + empty extension block (352 bytes) declaring ``shape``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_qform(np.diag([0.7, 0.7, 1.5, 1.0]), code=1)
    header.set_sform(np.diag([0.7, 0.7, 1.5, 1.0]), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def gzip_nifti_bomb() -> tuple[bytes, str]:
    """~0.5 MB ``.nii.gz`` whose header declares 512 x 512 x 1024 int16 (512 MiB) of zeros."""
    head = gzip.compress(nifti_header((512, 512, 1024)))
    return head + _zeros_stream("gzip", BOMB_BYTES), "nifti"


def lying_gzip_nifti_bomb() -> tuple[bytes, str]:
    """A ``.nii.gz`` whose header declares a small 64^3 volume with the slice axis first (the
    inflate-whole path), followed by 512 MiB of zeros: the cap, not the header, must stop it."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((64, 64, 64))
    header.set_data_dtype(np.int16)
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    head = gzip.compress(header.binaryblock + b"\0" * 4)
    return head + _zeros_stream("gzip", BOMB_BYTES), "nifti"


@cache
def lying_axial_gzip_nifti_bomb() -> tuple[bytes, str]:
    """A ``.nii.gz`` declaring 64^3 int16 (axial: the slice-streaming path) whose single gzip
    member inflates to 512 MiB (~0.5 MB): one inflate call must not make it all at once."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(nifti_header((64, 64, 64)))]
    zeros = bytes(MiB)
    parts += [deflate.compress(zeros) for _ in range(BOMB_BYTES // MiB)]
    return b"".join(parts) + deflate.flush(), "nifti"


def nifti_header_claim() -> tuple[bytes, str]:
    """A bare NIfTI header claiming 4096^3 int16 (128 GiB), no voxels."""
    return nifti_header((4096, 4096, 4096)), "nifti"


def bzip2_nrrd_bomb() -> tuple[bytes, str]:
    """A bzip2 NRRD declaring 512 x 512 x 1024 int16 (512 MiB), ~60 KB."""
    head = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 1024\n"
            b"encoding: bzip2\nendian: little\n\n")
    return head + _zeros_stream("bzip2", BOMB_BYTES), "nrrd"


def lying_bzip2_nrrd_bomb() -> tuple[bytes, str]:
    """A bzip2 NRRD declaring 64^3 int16 whose data inflates to 512 MiB."""
    head = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\n"
            b"encoding: bzip2\nendian: little\n\n")
    return head + _zeros_stream("bzip2", BOMB_BYTES), "nrrd"


@cache
def zip_member_bomb() -> tuple[bytes, str]:
    """A zip with one 256 MiB member of zeros named like a DICOM file (~0.25 MB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("series/slice0001.dcm", "w", force_zip64=True) as member:
            zeros = bytes(MiB)
            for _ in range(BOMB_BYTES // MiB // 2):
                member.write(zeros)
    return out.getvalue(), "zip"


@cache
def big_png(side: int = 8000) -> bytes:
    """A ``side`` x ``side`` grey PNG of zeros (~60 KB for 8000)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (side, side)).save(out, format="PNG", optimize=False, compress_level=9)
    return out.getvalue()


def png_zip_bomb() -> tuple[bytes, str]:
    """A zip of three 8000 x 8000 PNGs (64 M pixels each)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(3):
            zf.writestr(f"slices/{i:03d}.png", big_png())
    return out.getvalue(), "zip"


def png_bomb() -> tuple[bytes, str]:
    """One 8000 x 8000 PNG as a single slice."""
    return big_png(), "slices"


def npy_header_claim() -> tuple[bytes, str]:
    """A ``.npy`` header declaring (4096, 4096, 4096) int16, with 1 KB of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<i2", "fortran_order": False, "shape": (4096, 4096, 4096)})
    return out.getvalue() + bytes(1024), "npy"


def dicom_header_claim() -> tuple[bytes, str]:
    """A DICOM file declaring 1000 frames of 65535 x 65535 16-bit pixels, with 2 KB of data."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(2048)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), "dicom"


def garbage_zip_member() -> tuple[bytes, str]:
    """A zip of one 32 MiB member of zeros named ``.dcm``: not DICOM, refused at once."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("series/0001.dcm", bytes(32 * MiB))
    return out.getvalue(), "zip"


# name -> builder; the kinds the issue lists, plus the lying-header variants
BOMBS = {
    "gzip nifti": gzip_nifti_bomb,
    "gzip nifti, lying header": lying_gzip_nifti_bomb,
    "gzip nifti, lying header, one member": lying_axial_gzip_nifti_bomb,
    "bzip2 nrrd": bzip2_nrrd_bomb,
    "bzip2 nrrd, lying header": lying_bzip2_nrrd_bomb,
    "zip member": zip_member_bomb,
    "zip of pngs": png_zip_bomb,
    "png": png_bomb,
    "nifti header claim": nifti_header_claim,
    "npy header claim": npy_header_claim,
    "dicom header claim": dicom_header_claim,
}
