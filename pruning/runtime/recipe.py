"""Slice recipe: how one 3D volume becomes model-resolution RGB slices, and which slices stay.

A :class:`SliceRecipe` is small, picklable and torch-free, so the CPU side of a pipeline can
window and resize slices (and a method then choose among them) before anything reaches the GPU.
It is derived from a checkpoint's JSON files only (:func:`load_recipe`), never its weights.

Defaults, documented once here:
- CT in Hounsfield units is shown through the ``soft_tissue`` window (W400 / L40); MedGemma's
  three-window RGB packing (``rgb_packing=True``) is available for any family.
- uint8 input is taken as already windowed; other modalities (MR, ...) are min-max scaled.
- Each volume's slices are resized from their own size by the checkpoint processor's rule and
  resampling filter (Qwen: ``smart_resize`` with the processor's min / max pixels; Gemma3: its
  fixed size; Hulu-Med / VideoLLaMA3: the video processor's ``smart_resize`` at merge size 2,
  whose max pixels are the whole volume's budget, divided by its number of slices), so token
  counts equal what the HF processor gives for those slices.
  ``slice_size`` forces one size for every volume instead (uniform batches): slices are then
  resized as the processor would resize a slice of that size.
- ``gamma`` refers to the IAF scale of mean = std = 0.5, i.e. values in [-1, 1]
  (:meth:`SliceRecipe.iaf_input`), whatever the model's own normalisation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pruning.ops.windowing import apply_named_window, pack_three_windows, to_uint8_minmax
from pruning.runtime.adapters import family_for_config
from pruning.runtime.checkpoints import resolve_checkpoint

MODALITIES = ("CT", "MR", "MRI", "PT", "US", "XR", "OTHER")


class SliceRecipe(BaseModel):
    """Per-family preprocessing of volume slices into model input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(description="adapter family, e.g. 'qwen2_5_vl'")
    fixed_size: tuple[int, int] | None = Field(
        None, description="model input (height, width) for every slice (Gemma3's processor "
        "size); None: from each volume's own slice size by the Qwen resize rule")
    slice_size: tuple[int, int] | None = Field(
        None, description="resize every volume as the processor would a slice of this "
        "(height, width) (uniform batches); None: each volume's own size")
    patch_factor: int = Field(28, ge=1, description="Qwen: patch size x merge size")
    min_pixels: int = Field(56 * 56, ge=1, description="Qwen: smallest slice area in pixels")
    max_pixels: int = Field(28 * 28 * 1280, ge=1, description="Qwen: largest slice area")
    per_volume_budget: bool = Field(
        False, description="max_pixels is the budget of the whole volume, divided by its number "
        "of slices (VideoLLaMA3's video processor: Hulu-Med's 3-D input)")
    fixed_grid: tuple[int, int] | None = Field(
        None, description="LLM tokens per slice as rows x cols when fixed (Gemma3)")
    image_mean: tuple[float, float, float] = Field(description="processor mean per channel")
    image_std: tuple[float, float, float] = Field(description="processor std per channel")
    rescale_factor: float = Field(default=1 / 255, description="uint8 -> [0, 1] factor")
    resample: int = Field(default=3, description="PIL resampling filter (3 bicubic, 2 bilinear)")
    window: str = Field(default="soft_tissue", description="CT window for HU volumes")
    rgb_packing: bool = Field(default=False, description="MedGemma three-window RGB packing")

    # ----------------------------------------------------------------- geometry
    def size_for(self, height: int, width: int, slices: int = 1) -> tuple[int, int]:
        """Model input (h, w) for a volume of ``slices`` slices of ``height`` x ``width`` pixels
        (the slice count matters only with :attr:`per_volume_budget`)."""
        if self.fixed_size is not None:
            return self.fixed_size
        if self.slice_size is not None:
            height, width = self.slice_size
        return smart_resize(height, width, self.patch_factor, self.min_pixels,
                            self._max_pixels(slices))

    def _max_pixels(self, slices: int) -> int:
        """Largest slice area for a volume of ``slices`` slices."""
        if not self.per_volume_budget:
            return self.max_pixels
        return max(1, self.max_pixels // max(1, slices))

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """LLM tokens per slice as (rows, cols) for model-input slices of ``size``."""
        if self.fixed_grid is not None:
            return self.fixed_grid
        return size[0] // self.patch_factor, size[1] // self.patch_factor

    def tokens_per_slice(self, size: tuple[int, int]) -> int:
        """LLM visual tokens of one model-input slice of ``size``."""
        rows, cols = self.token_grid(size)
        return rows * cols

    # ----------------------------------------------------------------- preparation
    def prepare(self, volume: np.ndarray | Sequence[np.ndarray],
                modality: str = "CT") -> np.ndarray:
        """Window, resize and convert a volume to uint8 RGB slices at the model size.

        Args:
            volume: (D, H, W) or (D, H, W, 3), any real dtype (HU for CT), or a sequence of
                equally sized 2D / (H, W, 3) slices.
            modality: "CT" applies the recipe's window (or RGB packing) to non-uint8 input;
                anything else is min-max scaled.

        Returns:
            (D, h, w, 3) uint8 with (h, w) = :meth:`size_for` of the slices' own size (and, with
            a per-volume budget, of D).

        Raises:
            ValueError: wrong ndim, empty volume, non-finite values, mismatched slice sizes.
        """
        arr = check_volume(volume)
        if arr.dtype != np.uint8:
            if modality.upper() == "CT" and arr.ndim == 3:
                arr = (pack_three_windows(arr) if self.rgb_packing
                       else apply_named_window(arr, self.window))
            else:
                arr = to_uint8_minmax(arr)
        arr = self._resize(arr)
        if arr.ndim == 3:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr)

    def is_prepared(self, volume: np.ndarray, slices: int | None = None) -> bool:
        """True if ``volume`` is already uint8 (D, h, w, 3) at the size the recipe gives it.

        ``slices`` is the depth of the volume it was prepared from (default D): the planned
        slices of a larger volume keep the size that volume's budget gave them.
        """
        if not (isinstance(volume, np.ndarray) and volume.dtype == np.uint8 and volume.ndim == 4
                and volume.shape[-1] == 3):
            return False
        h, w = int(volume.shape[1]), int(volume.shape[2])
        slices = int(volume.shape[0]) if slices is None else slices
        if (h, w) == self.size_for(h, w, slices):
            return True
        # Below the minimum area only because the volume's budget shrank it: smart_resize
        # would grow it again, yet it is the size this volume's slices were given.
        factor, budget = self.patch_factor, self._max_pixels(slices)
        return (self.per_volume_budget and self.fixed_size is None and self.slice_size is None
                and h % factor == 0 and w % factor == 0 and h * w <= budget < self.min_pixels)

    def _resize(self, arr: np.ndarray) -> np.ndarray:
        h, w = self.size_for(int(arr.shape[1]), int(arr.shape[2]), int(arr.shape[0]))
        if arr.shape[1:3] == (h, w):
            return arr
        from PIL import Image

        out = np.empty((arr.shape[0], h, w, *arr.shape[3:]), dtype=np.uint8)
        for i, slc in enumerate(arr):
            out[i] = np.asarray(Image.fromarray(slc).resize((w, h), resample=self.resample))
        return out

    # ----------------------------------------------------------------- normalisation
    def lut(self, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None) -> np.ndarray:
        """(3, 256) float32 table reproducing the HF numpy ops exactly for every uint8 value.

        Defaults to the processor's own mean / std.
        """
        mean = self.image_mean if mean is None else mean
        std = self.image_std if std is None else std
        values = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        m = np.asarray(mean, dtype=np.float32)[:, None]
        s = np.asarray(std, dtype=np.float32)[:, None]
        return (values[None, :] - m) / s

    def normalise(self, slices_u8: np.ndarray) -> np.ndarray:
        """uint8 (D, h, w, 3) -> float32 (D, 3, h, w) on the processor's normalised scale."""
        return _apply_lut(slices_u8, self.lut())

    def iaf_input(self, slices_u8: np.ndarray) -> np.ndarray:
        """uint8 (D, h, w, 3) -> float32 (D, 3, h, w) on the [-1, 1] scale gamma refers to."""
        return _apply_lut(slices_u8, self.lut((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def _apply_lut(slices_u8: np.ndarray, lut: np.ndarray) -> np.ndarray:
    if slices_u8.dtype != np.uint8 or slices_u8.ndim != 4 or slices_u8.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 slices of shape (D, h, w, 3), got {slices_u8.dtype} {slices_u8.shape}"
        )
    chw = np.moveaxis(slices_u8, -1, 1)  # (D, 3, h, w)
    return np.stack([lut[c][chw[:, c]] for c in range(3)], axis=1)


def check_volume(volume: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Validate a volume and return it as an ndarray; see :meth:`SliceRecipe.prepare`."""
    if isinstance(volume, (list, tuple)):
        if not volume:
            raise ValueError("expected a volume with at least one slice, got an empty sequence")
        shapes = {np.shape(s) for s in volume}
        if len(shapes) != 1:
            raise ValueError(f"mismatched slice sizes {sorted(shapes)}; all slices must have "
                             "one shape")
        volume = np.stack([np.asarray(s) for s in volume])
    arr = np.asarray(volume)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"expected a numeric volume, got dtype {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise ValueError(f"expected a volume of shape (D, H, W) or (D, H, W, 3), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"expected a non-empty volume, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("volume contains NaN or infinite values; expected finite intensities")
    return arr


# --------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def image_processor_config(ckpt: Path) -> dict[str, Any]:
    """The image-processor JSON of a checkpoint (preprocessor_config or processor_config)."""
    pre = _read_json(ckpt / "preprocessor_config.json")
    if pre:
        return pre
    return dict(_read_json(ckpt / "processor_config.json").get("image_processor", {}))


def video_processor_config(ckpt: Path) -> dict[str, Any]:
    """The video-processor JSON of a checkpoint (video_preprocessor_config or
    processor_config), or ``{}`` when it has none."""
    pre = _read_json(ckpt / "video_preprocessor_config.json")
    if pre:
        return pre
    return dict(_read_json(ckpt / "processor_config.json").get("video_processor", {}))


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: multiples of ``factor``, pixel count within [min, max]."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def recipe_from_configs(
    config: dict[str, Any],
    proc: dict[str, Any],
    *,
    video: dict[str, Any] | None = None,
    slice_size: tuple[int, int] | None = None,
    window: str = "soft_tissue",
    rgb_packing: bool = False,
) -> SliceRecipe:
    """Build the recipe from a checkpoint's ``config.json`` and image-processor JSON dicts.

    ``video`` is the video processor's JSON: Hulu-Med (VideoLLaMA3) shows a volume as a video
    of its slices, so its video processor sizes them (merge size 2, the max pixels shared by
    all slices); without one, its image processor's settings are read at merge size 2.
    ``slice_size`` (height, width), when given, resizes every volume as the processor would
    resize a slice of that size; by default each volume is resized from its own size.
    """
    family = family_for_config(config)
    video_frames = family == "hulu_med"
    if video_frames and video:
        proc = video
    mean = tuple(proc.get("image_mean", (0.5, 0.5, 0.5)))
    std = tuple(proc.get("image_std", (0.5, 0.5, 0.5)))
    common = dict(family=family, image_mean=mean, image_std=std, window=window,
                  rgb_packing=rgb_packing, rescale_factor=proc.get("rescale_factor", 1 / 255),
                  slice_size=None if slice_size is None else tuple(slice_size))
    if family == "gemma3":
        size = proc.get("size", {"height": 896, "width": 896})
        tokens = int(config.get("mm_tokens_per_image", 256))
        side = math.isqrt(tokens)
        return SliceRecipe(fixed_size=(size["height"], size["width"]), fixed_grid=(side, side),
                           resample=proc.get("resample", 2), **common)
    vision = config.get("vision_config", {})
    patch = int(proc.get("patch_size", vision.get("patch_size", 14)))
    # Hulu-Med's 3-D input is a video: merge size 2 (its images use 1), whatever the image
    # processor's own default says.
    merge = 2 if video_frames and not video else int(
        proc.get("merge_size", vision.get("spatial_merge_size", 2)))
    size = proc.get("size") or {}
    min_px = int(proc.get("min_pixels") or size.get("shortest_edge", 56 * 56))
    max_px = int(proc.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280))
    return SliceRecipe(patch_factor=patch * merge, min_pixels=min_px, max_pixels=max_px,
                       per_volume_budget=video_frames and bool(video),
                       resample=proc.get("resample", 3), **common)


def load_recipe(
    model_path_or_id: str | Path,
    *,
    slice_size: tuple[int, int] | None = None,
    window: str = "soft_tissue",
    rgb_packing: bool = False,
    cache_dir: str | None = None,
) -> SliceRecipe:
    """Read a checkpoint's config and image-processor JSON (no weights) into a recipe.

    Args:
        model_path_or_id: a model spec :func:`pruning.runtime.checkpoints.resolve_checkpoint`
            understands (folder, cached hub id, ``phantom``, ``tiny:<family>``).
        slice_size: force one resize for every volume (see :func:`recipe_from_configs`).
        window: CT window name (see :data:`pruning.ops.windowing.WINDOWS`).
        rgb_packing: use MedGemma's three-window RGB packing for HU input.
        cache_dir: where ``tiny:`` checkpoints are built.
    """
    ckpt = resolve_checkpoint(model_path_or_id, cache_dir=cache_dir)
    config = _read_json(ckpt / "config.json")
    if not config:
        raise FileNotFoundError(f"no config.json in checkpoint {ckpt}")
    return checkpoint_recipe(ckpt, config, slice_size=slice_size, window=window,
                             rgb_packing=rgb_packing)


def checkpoint_recipe(ckpt: Path, config: dict[str, Any], *,
                      slice_size: tuple[int, int] | None = None, window: str = "soft_tissue",
                      rgb_packing: bool = False) -> SliceRecipe:
    """The recipe of a resolved checkpoint folder whose ``config.json`` is ``config``: its
    image- and video-processor JSON read here (see :func:`recipe_from_configs`)."""
    return recipe_from_configs(config, image_processor_config(ckpt),
                               video=video_processor_config(ckpt), slice_size=slice_size,
                               window=window, rgb_packing=rgb_packing)
