"""Shared helpers of the Serve tests: a running app's handle, small volumes, rows as the
preprocessing deployment hands them on, a fake analysis backend, a DICOM file with identifiers."""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.api import AnalysisJob, AnalysisResult
from serve.security import ApiError

TOKEN = "test-token"
MiB = 1024 * 1024
UNIT_TOKEN = "unit-token"  # the fake backend's app (tests/serve/test_api.py)
UNIT_AUTH = {"Authorization": f"Bearer {UNIT_TOKEN}"}

@dataclass
class Served:
    """A running app: its base URL, token, allowed root, checkpoint and builder args."""

    url: str
    token: str
    root: Path
    outside: Path
    model_dir: str
    args: dict

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def phantom_volume(depth: int = 12, side: int = 48, seed: int = 0) -> np.ndarray:
    """A small CT-like int16 volume in HU (D, H, W): body disc, moving blob, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:depth, 0:side, 0:side]
    vol = np.full((depth, side, side), -1000.0)
    vol[(y - side / 2) ** 2 + (x - side / 2) ** 2 < (side * 0.4) ** 2] = 40.0
    blob = (y - side * (0.3 + 0.4 * z / depth)) ** 2 + (x - side / 2) ** 2 < (side * 0.1) ** 2
    vol[blob] = 300.0
    vol += rng.normal(0, 20, vol.shape)
    return vol.astype(np.int16)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` into bytes."""
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def fill_root(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    np.save(root / "ct.npy", phantom_volume())
    np.save(root / "deep.npy", np.zeros((80, 8, 8), np.int16))  # > max_slices
    np.save(root / "wide.npy", np.zeros((2, 8, 600), np.int16))  # > max_side
    np.save(root / "flat.npy", np.zeros((8, 8), np.int16))  # 2-D
    (outside / "secret.npy").write_bytes(npy_bytes(phantom_volume(seed=1)))
    (root / "escape.npy").symlink_to(outside / "secret.npy")


def loaded_rows(model_dir: str, questions: tuple[str, ...], max_new_tokens: int = 4) -> list[dict]:
    """Rows as the preprocessing deployment hands them to the model: one distinct volume per
    question, medpruner defaults."""
    from pipeline.stages import LoadStage
    from pruning import PruningConfig
    from serve.app import batch_to_rows

    n = len(questions)
    pruning = np.array([PruningConfig(method="medpruner").model_dump_json()] * n, object)
    batch = {"id": np.array([f"r{i}" for i in range(n)], object),
             "volume_uri": np.array([""] * n, object),
             "volume_format": np.array(["npy"] * n, object),
             "volume_bytes": np.array([npy_bytes(phantom_volume(seed=i)) for i in range(n)],
                                      object),
             "pruning": pruning, "prompt": np.array(questions, object),
             "max_new_tokens": np.array([max_new_tokens] * n)}
    return batch_to_rows(LoadStage(model_dir)(batch))


def gathered_vs_alone(app: str, rows: list[dict]) -> tuple[list, list, dict[int, int]]:
    """Send ``rows`` to the app's model deployment one by one, then all at once: (answers
    alone, answers together, {rows per stage call: calls} of the concurrent part)."""
    from ray import serve

    model = serve.get_deployment_handle("ModelServer", app)
    alone = [model.infer.remote(r).result() for r in rows]
    before = model.batch_stats.remote().result()
    together = [response.result() for response in [model.infer.remote(r) for r in rows]]
    after = model.batch_stats.remote().result()
    calls = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return alone, together, calls


def npy_zeros(depth: int = 3) -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros((depth, 16, 16), np.int16))
    return out.getvalue()


class FakeBackend:
    def __init__(self) -> None:
        self.jobs: list[AnalysisJob] = []
        self.delay = 0.0
        self.fail: ApiError | None = None

    async def analyze(self, job: AnalysisJob) -> AnalysisResult:
        self.jobs.append(job)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        row = {"prediction": "B", "slices_total": 3, "slices_kept": 2, "tokens_total": 48,
               "tokens_kept": 10, "r_rate": 10 / 48, "kept_slices_json": "[0, 2]",
               "kept_tokens_json": "[[0, 1, 2], [3]]", "t_load_s": 0.01, "t_decode_s": 0.02,
               "t_prefill_s": float("nan")}
        return AnalysisResult(row=row, slices=np.zeros((2, 8, 8, 3), np.uint8), token_grid=(4, 4))

    async def ready(self) -> dict:
        return {"family": "fake"}


def analyze_body(**extra) -> dict:
    body = {"volume": {"data": base64.b64encode(npy_zeros()).decode(), "format": "npy"},
            "question": "Which organ?", "task": "closed", "choices": {"A": "liver", "B": "lung"}}
    return body | extra


def dicom_bytes() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    ds.InstitutionName = "General Hospital"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
