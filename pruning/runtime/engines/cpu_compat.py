"""Make PyPI's torchvision importable beside the CPU build of torch (CPU hosts only).

Why: PyPI ships torchvision only as a CUDA build. Beside the CPU torch wheel its C extension
(``torchvision/_C.so``) fails to load (``libc10_cuda.so`` is missing), and ``import
torchvision`` then dies in ``torchvision/_meta_registrations.py``, which registers fake kernels
for ``torchvision::nms`` and ``torchvision::qnms`` whether or not the extension loaded
(``RuntimeError: operator torchvision::nms does not exist``). vLLM needs torchvision importable:
its engine-core module imports it through transformers, and the Qwen-VL processors need
torchvision's video processor.

What: :func:`ensure_torchvision_importable` declares the schemas of exactly those two operators
(no kernels) when, and only when, torch is a CPU build and torchvision's extension cannot be
loaded. Then torchvision imports with its compiled operators (nms, roi_align, ...) unavailable,
which neither vLLM's text path nor the Qwen image processors call. On a CUDA host, or when the
extension loads, it does nothing.

Where it runs: :mod:`pruning.runtime.engines.vllm_engine` calls it before importing vLLM, and
the plugin's ``register()`` calls it too. A process vLLM *spawns* (always inside a Ray actor)
imports vLLM before any plugin loads, so ``scripts/setup.sh`` also installs, on CPU hosts only,
a one-line ``.pth`` startup hook (:func:`install_startup_hook`) that runs this check lazily the
first time any process of the environment imports torchvision (it imports nothing before that).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Operators torchvision registers fake kernels for unconditionally at import (its other
# registrations are skipped when the extension is missing).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_HOOK_NAME = "medpruner_torchvision_cpu.pth"
_state: dict[str, object] = {}


def _extension_loads() -> bool:
    """True when torchvision's compiled ``_C`` extension loads into this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to fix
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C*.so")):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's two fake-registered operator schemas if its extension cannot load.

    Idempotent. Returns True when the schemas were declared (now or earlier), False when
    nothing was needed (CUDA torch, torchvision absent or already imported, extension loads).
    """
    if "applied" in _state:
        return bool(_state["applied"])
    if "torchvision" in sys.modules:
        _state["applied"] = False
        return False
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None or _extension_loads():
        _state["applied"] = False
        return False
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 (kept alive below)
        for schema in _SCHEMAS:
            lib.define(schema)
        _state["library"] = lib  # a Library object unregisters its definitions when collected
    _state["applied"] = True
    return True


class _TorchvisionImportHook:
    """Meta-path finder that runs :func:`ensure_torchvision_importable` on first import."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Run the check lazily, the first time this process imports torchvision."""
    if "torchvision" not in sys.modules and not any(
            isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


# The .pth line: a finder that imports this module only when torchvision is being imported
# (interpreter start-up stays free of torch), then applies the check.
_PTH_CODE = (
    "class _MedPrunerTorchvisionHook:\n"
    " def find_spec(self, name, path=None, target=None):\n"
    "  if name == 'torchvision':\n"
    "   sys.meta_path.remove(self)\n"
    "   try:\n"
    "    from pruning.runtime.engines.cpu_compat import ensure_torchvision_importable\n"
    "   except ImportError:\n"
    "    return None\n"
    "   ensure_torchvision_importable()\n"
    "  return None\n"
    "sys.meta_path.insert(0, _MedPrunerTorchvisionHook())\n"
)


def install_startup_hook(site_packages: str | Path | None = None) -> Path | None:
    """Write the ``.pth`` file that applies the check in every process of this environment.

    Only on CPU hosts (torch without CUDA/ROCm); returns the file written, or None.
    """
    import sysconfig

    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return None
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / _HOOK_NAME
    path.write_text(f"import sys; exec({_PTH_CODE!r})\n")
    return path


if __name__ == "__main__":  # python -m pruning.runtime.engines.cpu_compat  (used by setup.sh)
    written = install_startup_hook()
    print(f"cpu_compat: {'wrote ' + str(written) if written else 'CUDA torch: no hook needed'}")
