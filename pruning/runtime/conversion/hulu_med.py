"""``medpruner convert hulu-med SRC DST``: a Hulu-Med checkpoint in its GitHub code's layout ->
a native ``VideoLlama3ForConditionalGeneration`` folder.

SRC holds ``config.json`` (``model_type`` ``hulumed_qwen2`` / ``hulumed_qwen3``, possibly written
by transformers 4.x), ``model.safetensors`` or shards with ``model.safetensors.index.json``, the
vision encoder folder its ``vision_encoder`` field names (or ``--vision-encoder DIR``), and
where it has them tokenizer files, a chat template, ``generation_config.json`` and the image
processor's ``preprocessor_config.json`` (at its top or in the encoder folder).

Everything is read and checked before anything is written: the layout, every renamed key
against the native model built from the converted config on the meta device (missing keys,
unexpected keys, shapes). The output is written to a temporary folder beside DST and renamed to
DST at the end, so a failure leaves no DST. Tensors are copied unchanged (same dtype, same
values), one shard at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.runtime.conversion.configs import CHAT_TEMPLATE, native_config, native_processor_config
from pruning.runtime.conversion.configs import vision_config as vision_fields
from pruning.runtime.conversion.layouts import ConversionError, Layout, detect_layout, rename_keys

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# Keys of a source tokenizer_config.json that point at Hulu-Med's remote code.
_REMOTE_TOKENIZER_KEYS = ("auto_map", "processor_class")


@dataclass
class ConversionResult:
    """What a conversion wrote: the folder, the layout read, counts and notes for the user."""

    dst: Path
    layout: str
    tensors: int
    notes: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """Everything read from SRC and checked; writing it cannot fail on the checkpoint's content."""

    src: Path
    config: Any  # VideoLlama3Config
    layout: Layout
    shards: dict[str, list[str]]  # source file -> its source keys
    mapping: dict[str, str]  # source key -> native key
    sharded: bool
    image_token: str | None
    processor: dict[str, Any] | None
    notes: list[str]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"no {what} at {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def _open(path: Path):
    """``safe_open`` with an unreadable file reported as a :class:`ConversionError`."""
    from safetensors import safe_open

    try:
        return safe_open(path, "pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"{path} is not a readable safetensors file ({exc})") from exc


def source_shards(src: Path) -> tuple[dict[str, list[str]], bool]:
    """Source weight file -> its keys, and whether SRC is sharded.

    Raises:
        ConversionError: no safetensors weights, or an index naming a missing file.
    """
    if (src / INDEX).is_file():
        weight_map = _read_json(src / INDEX, "weight index").get("weight_map") or {}
        shards: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(name, []).append(key)
        for name in shards:
            if not (src / name).is_file():
                raise ConversionError(f"{INDEX} names {name}, which is not in {src}")
        return shards, True
    if (src / WEIGHTS).is_file():
        with _open(src / WEIGHTS) as f:
            return {WEIGHTS: list(f.keys())}, False
    found = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
    raise ConversionError(f"no {WEIGHTS} or {INDEX} in {src} (found weight files {found})")


def _shapes(src: Path, shards: dict[str, list[str]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, keys in shards.items():
        with _open(src / name) as f:
            for key in keys:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _encoder_folder(src: Path, config: dict[str, Any], override: str | Path | None) -> Path:
    """The vision encoder folder: ``--vision-encoder`` or the config's ``vision_encoder``."""
    if override is not None:
        folder, origin = Path(override), "--vision-encoder"
    elif isinstance(config.get("vision_encoder"), str):
        folder, origin = src / config["vision_encoder"], "config.json vision_encoder"
    else:
        raise ConversionError(f"config.json vision_encoder is {config.get('vision_encoder')!r}, "
                              "not a folder; pass --vision-encoder DIR")
    if not (folder / "config.json").is_file():
        raise ConversionError(f"vision encoder folder {folder} (from {origin}) has no "
                              "config.json; pass --vision-encoder DIR")
    return folder


def _source_name(native_key: str, layout: Layout) -> str:
    """The source-layout name of a native key (for messages)."""
    for source, target in layout.renames:
        if native_key.startswith(target):
            return source + native_key[len(target):]
    return native_key


def check_native(mapping: dict[str, str], shapes: dict[str, tuple[int, ...]], config: Any,
                 layout: Layout) -> None:
    """Compare renamed keys and shapes with the native model built from ``config``.

    Raises:
        ConversionError: a missing key, an unexpected key or a shape mismatch (the first one,
            with its source name and the count).
    """
    import torch
    from transformers import VideoLlama3ForConditionalGeneration

    with torch.device("meta"):
        model = VideoLlama3ForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = {target: shapes[source] for source, target in mapping.items()}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(renamed) - tied)
    if missing:
        raise ConversionError(f"missing weight {_source_name(missing[0], layout)!r} (native "
                              f"{missing[0]!r}; {len(missing)} missing in all)")
    unexpected = sorted(set(renamed) - set(expected))
    if unexpected:
        source = {t: s for s, t in mapping.items()}[unexpected[0]]
        raise ConversionError(f"unexpected weight {source!r} (native {unexpected[0]!r} is not "
                              f"in the model; {len(unexpected)} unexpected in all)")
    for source, target in sorted(mapping.items()):
        if shapes[source] != expected[target]:
            raise ConversionError(f"shape mismatch: {source!r} is {list(shapes[source])}, native "
                                  f"{target!r} needs {list(expected[target])}")


def _token_ids(src: Path) -> dict[str, int]:
    """Token string -> id of the added (special) tokens of SRC's tokenizer files."""
    tokens: dict[str, int] = {}
    if (src / "tokenizer.json").is_file():
        for item in _read_json(src / "tokenizer.json", "tokenizer").get("added_tokens", []):
            tokens[item["content"]] = int(item["id"])
    if (src / "tokenizer_config.json").is_file():
        decoder = _read_json(src / "tokenizer_config.json", "tokenizer config").get(
            "added_tokens_decoder", {})
        tokens.update({item["content"]: int(i) for i, item in decoder.items()})
    if (src / "added_tokens.json").is_file():
        tokens.update(_read_json(src / "added_tokens.json", "added tokens"))
    return tokens


def _processor(src: Path, encoder: Path, patch_size: int, notes: list[str]) -> dict | None:
    """The native processor config from Hulu-Med's image processor settings, if SRC has them."""
    for folder in (src, encoder):
        if (folder / "preprocessor_config.json").is_file():
            pre = _read_json(folder / "preprocessor_config.json", "image processor config")
            # Hulu-Med's image processor defaults (VideoLLaMA3's) where the file is silent.
            return native_processor_config(
                patch_size=int(pre.get("patch_size", patch_size)),
                min_tokens=int(pre.get("min_tokens", 16)),
                max_tokens=int(pre.get("max_tokens", 16384)),
                image_mean=pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
                image_std=pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
                resample=int(pre.get("resample", 3)),
                rescale_factor=float(pre.get("rescale_factor", 1 / 255)))
    notes.append(f"no preprocessor_config.json in {src} or {encoder}: wrote no processor config")
    return None


def plan_conversion(src: Path, vision_encoder: str | Path | None = None) -> _Plan:
    """Read and check SRC; nothing is written.

    Raises:
        ConversionError: see :func:`convert_hulu_med`.
    """
    config = _read_json(src / "config.json", "config.json")
    shards, sharded = source_shards(src)
    keys = [key for keys in shards.values() for key in keys]
    layout = detect_layout(config.get("model_type"), keys)
    encoder = _encoder_folder(src, config, vision_encoder)
    vision = vision_fields(_read_json(encoder / "config.json", "vision encoder config"),
                           str(encoder / "config.json"))
    tokens = _token_ids(src)
    native = native_config(config, layout.text_model_types[config["model_type"]], vision,
                           tokens.get("<|video_pad|>"))
    mapping = rename_keys(keys, layout)
    check_native(mapping, _shapes(src, shards), native, layout)
    image_token = {i: t for t, i in tokens.items()}.get(native.image_token_id)
    notes: list[str] = []
    if tokens and image_token is None:
        raise ConversionError(f"image_token_index {native.image_token_id} is not an added token "
                              f"of the tokenizer in {src}")
    processor = _processor(src, encoder, int(vision["patch_size"]), notes)
    return _Plan(src, native, layout, shards, mapping, sharded, image_token, processor, notes)


def _write_weights(plan: _Plan, out: Path) -> int:
    """Renamed tensors, shard by shard under the source file names; returns their count."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for name, keys in plan.shards.items():
        with _open(plan.src / name) as f:
            tensors = {plan.mapping[k]: f.get_tensor(k) for k in keys if k in plan.mapping}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if plan.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(weight_map)


def _chat_template(src: Path) -> tuple[str | None, str]:
    """SRC's chat template and where it came from (None when SRC has none)."""
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(), "chat_template.jinja"
    for name, what in (("chat_template.json", "chat template"),
                       ("tokenizer_config.json", "tokenizer config")):
        if (src / name).is_file():
            template = _read_json(src / name, what).get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = {t.get("name"): t.get("template") for t in template}.get("default")
            if isinstance(template, str) and template:
                return template, name
    return None, ""


def _write_text_side(plan: _Plan, out: Path) -> None:
    """Tokenizer files (image token named), chat template and generation config."""
    copied = [name for name in TOKENIZER_FILES if (plan.src / name).is_file()]
    for name in copied:
        shutil.copyfile(plan.src / name, out / name)
    if "tokenizer_config.json" in copied:
        tok_config = _read_json(out / "tokenizer_config.json", "tokenizer config")
        for key in _REMOTE_TOKENIZER_KEYS:
            tok_config.pop(key, None)
        # What the native processor expands: the token of the model's image_token_id.
        tok_config["image_token"] = plan.image_token
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    elif not copied:
        plan.notes.append(f"no tokenizer files in {plan.src}: wrote none")
    template, origin = _chat_template(plan.src)
    if template is None:
        template = CHAT_TEMPLATE
        plan.notes.append("SRC has no chat template: wrote Hulu-Med's published default")
    else:
        plan.notes.append(f"chat template from SRC {origin}")
    (out / "chat_template.jinja").write_text(template)
    if (plan.src / "generation_config.json").is_file():
        shutil.copyfile(plan.src / "generation_config.json", out / "generation_config.json")


def convert_hulu_med(src: str | Path, dst: str | Path, *,
                     vision_encoder: str | Path | None = None) -> ConversionResult:
    """Convert a GitHub-layout Hulu-Med checkpoint into a native VideoLLaMA3 folder.

    Args:
        src: the checkpoint folder (``config.json`` with model_type ``hulumed_qwen2`` /
            ``hulumed_qwen3``, safetensors weights).
        dst: the folder to create; it must not exist.
        vision_encoder: the vision encoder folder, when the config's ``vision_encoder`` does
            not name one under SRC.

    Returns:
        What was written (folder, layout, tensor count, notes).

    Raises:
        ConversionError: SRC is not a folder, DST exists, the layout is unknown, a weight is
            missing, unexpected or of the wrong shape, a config is missing or incomplete. The
            message is one line; nothing is left at DST.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a folder")
    if dst.exists():
        raise ConversionError(f"DST {dst} already exists; give a new folder")
    plan = plan_conversion(src, vision_encoder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        tensors = _write_weights(plan, tmp)
        plan.config.save_pretrained(tmp)
        if plan.processor is not None:
            (tmp / "processor_config.json").write_text(json.dumps(plan.processor, indent=2) + "\n")
        _write_text_side(plan, tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(dst=dst, layout=plan.layout.name, tensors=tensors, notes=plan.notes)
