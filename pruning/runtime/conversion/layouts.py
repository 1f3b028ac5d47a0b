"""Weight-name tables: one per source layout of a Hulu-Med checkpoint, to the native
``VideoLlama3ForConditionalGeneration`` names.

A layout is recognised by its config's ``model_type`` and by a key prefix only it has; its
renames are (source prefix, native prefix) pairs, the first match winning, and keys ending in
one of its ``dropped`` suffixes are computed buffers that never travel (the vision rotary
``inv_freq``). The Hub's "HF-Version" checkpoints become one more :class:`Layout` here once their
key names are known.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; its message is one line naming what was found."""


@dataclass(frozen=True)
class Layout:
    """How one source layout names its weights."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values of this layout
    text_model_types: dict[str, str]  # source model_type -> transformers text model_type
    signature: str  # a key prefix every checkpoint of this layout has
    renames: tuple[tuple[str, str], ...]  # (source prefix, native prefix); first match wins
    dropped: tuple[str, ...] = ()  # key suffixes never copied (computed buffers)


GITHUB = Layout(
    name="github",
    model_types=("hulumed_qwen2", "hulumed_qwen3"),
    text_model_types={"hulumed_qwen2": "qwen2", "hulumed_qwen3": "qwen3"},
    signature="model.vision_encoder.vision_encoder.",
    renames=(
        ("model.vision_encoder.vision_encoder.", "model.vision_model."),
        ("model.mm_projector.", "model.projector."),
        ("model.", "model.language_model."),
        ("lm_head.", "lm_head."),
    ),
    dropped=("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq"),
)
LAYOUTS: tuple[Layout, ...] = (GITHUB,)


def _prefixes(keys: Iterable[str], depth: int = 2) -> list[str]:
    """The distinct first ``depth`` dotted parts of ``keys``, as globs (for error messages)."""
    return sorted({".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
                   for parts in (key.split(".") for key in keys)})


def detect_layout(model_type: str | None, keys: Iterable[str]) -> Layout:
    """The layout a checkpoint's ``model_type`` and weight keys belong to.

    Raises:
        ConversionError: no known layout has this model_type and key signature (names what was
            found and what is known).
    """
    keys = list(keys)
    for layout in LAYOUTS:
        if model_type in layout.model_types and any(k.startswith(layout.signature) for k in keys):
            return layout
    known = "; ".join(f"{lay.name}: model_type {'/'.join(lay.model_types)} with keys "
                      f"{lay.signature}*" for lay in LAYOUTS)
    shown = _prefixes(keys)
    found = ", ".join(shown[:6]) + (f" (+{len(shown) - 6} more)" if len(shown) > 6 else "")
    raise ConversionError(f"unknown checkpoint layout: model_type {model_type!r}, weight keys "
                          f"{found or 'none'}; known layouts: {known}")


def rename_keys(keys: Iterable[str], layout: Layout) -> dict[str, str]:
    """Source key -> native key for every key ``layout`` copies (computed buffers left out).

    Raises:
        ConversionError: a key that no rename of the layout matches.
    """
    mapping: dict[str, str] = {}
    for key in keys:
        if key.endswith(layout.dropped):
            continue
        for source, target in layout.renames:
            if key.startswith(source):
                mapping[key] = target + key[len(source):]
                break
        else:
            raise ConversionError(f"unexpected weight {key!r} for the {layout.name} layout "
                                  f"(it renames {', '.join(s for s, _ in layout.renames)})")
    return mapping
