"""Decoding speed: a 300 x 512 x 512 int16 CT ``.nii.gz`` through ``load_volume`` vs nibabel.

Compared side by side in one run, interleaved, medians over repeats, MB/s of decoded voxels:
- ``load_volume``: isal gzip decode, zero-copy header parse, one reorienting copy to (z, y, x);
- nibabel default: ``np.asanyarray(nib.load(path).dataobj)`` (what a careful user writes; it
  uses indexed_gzip when installed), native dtype, no reorientation;
- nibabel ``get_fdata()`` (float64), the common shortcut, for reference.
Wall and CPU seconds (all threads of the process) are both printed. A second table gives the
cost of the decoding limits: ``load_volume`` with the default ``DecodeLimits`` (header checks,
output-capped inflation, the trailing-data check, the time budget) against
``DecodeLimits.unlimited()``, which skips every check (the decoder as it was before the
limits), interleaved, medians of per-repeat ratios.
The file is a phantom CT (HU, realistic compressibility) saved by nibabel with a RAS affine,
as most converters write it. Usage: ``python -m jobs.benchmark data [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.io.limits import DecodeLimits
from pipeline.io.volumes import load_volume
from pipeline.synthetic.ct import make_phantom


def _make_file(folder: Path, depth: int, size: int) -> Path:
    import nibabel as nib

    volume = make_phantom(0, depth=depth, size=size).volume  # (D, H, W) int16 HU
    data = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0))  # RAS voxel order
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.5, 1.0])), path)
    return path


def _time(fn: Callable[[], np.ndarray]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out.size > 0
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    """Print the decoding table; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark data", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="64 x 256 x 256 instead of 300 x 512 x 512")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per method")
    args = parser.parse_args(argv)
    import nibabel as nib

    depth, size = (64, 256) if args.quick else (300, 512)
    methods: dict[str, Callable[[Path], Callable[[], np.ndarray]]] = {
        "load_volume (ours)": lambda p: lambda: load_volume(str(p)).array,
        "load_volume, caps off": lambda p: lambda: load_volume(
            str(p), limits=DecodeLimits.unlimited()).array,
        "nibabel asanyarray(dataobj)": lambda p: lambda: np.asanyarray(nib.load(str(p)).dataobj),
        "nibabel get_fdata() float64": lambda p: lambda: nib.load(str(p)).get_fdata(),
    }
    try:
        import indexed_gzip  # noqa: F401

        igz = "yes"
    except ImportError:
        igz = "no"
    with tempfile.TemporaryDirectory() as tmp:
        path = _make_file(Path(tmp), depth, size)
        decoded_mb = depth * size * size * 2 / 1e6
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, make in methods.items():
                times[name].append(_time(make(path)))
        file_mb = path.stat().st_size / 1e6
    print(f"decoding {depth} x {size} x {size} int16 .nii.gz ({decoded_mb:.0f} MB decoded, "
          f"{file_mb:.0f} MB on disk); median of {args.repeats} interleaved runs; "
          f"indexed_gzip installed: {igz}")
    print("| method | wall s | MB/s | vs nibabel default | CPU s | CPU MB/s | CPU vs nibabel |")
    print("|---|---|---|---|---|---|---|")
    base = [statistics.median(t[i] for t in times["nibabel asanyarray(dataobj)"]) for i in (0, 1)]
    for name, values in times.items():
        wall, cpu = (statistics.median(t[i] for t in values) for i in (0, 1))
        print(f"| {name} | {wall:.3f} | {decoded_mb / wall:.0f} | {base[0] / wall:.2f}x "
              f"| {cpu:.3f} | {decoded_mb / cpu:.0f} | {base[1] / cpu:.2f}x |")
    print("CPU time counts every thread of this process (load_volume inflates in a second thread),"
          " so it is the fair figure on a busy machine; wall time is what a single job sees.")
    _print_caps_cost(times)
    return 0


def _print_caps_cost(times: dict[str, list[tuple[float, float]]]) -> None:
    """Cost of the decoding limits: caps on (default DecodeLimits) vs off, same runs."""
    on, off = times["load_volume (ours)"], times["load_volume, caps off"]
    print()
    print("| decoding limits | wall s | CPU s |")
    print("|---|---|---|")
    for name, values in (("on (defaults)", on), ("off (unlimited)", off)):
        wall, cpu = (statistics.median(t[i] for t in values) for i in (0, 1))
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    ratios = [statistics.median(a[i] / b[i] for a, b in zip(on, off, strict=True)) for i in (0, 1)]
    print(f"caps on / off, median of per-repeat ratios: wall {ratios[0]:.3f}, CPU {ratios[1]:.3f} "
          f"({(ratios[0] - 1) * 100:+.1f} % wall; target < +3 %)")


if __name__ == "__main__":
    raise SystemExit(main())
