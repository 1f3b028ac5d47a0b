"""A Hulu-Med checkpoint in its GitHub code's layout, written offline from a native tiny one.

Built from the key names and config fields Hulu-Med's GitHub code uses (what the project's
spec records), never from that code: the native weights are renamed *backwards* by the rules
below, the text fields go to the top of a 4.x-style ``config.json`` (``rope_theta``,
``torch_dtype``), and the vision encoder gets its own folder (``config.json`` of model_type
``hulumed_vision_encoder`` and the ``HulumedImageProcessor`` settings). It is what
``medpruner convert hulu-med`` reads; the conversion tests start from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Native prefix -> GitHub prefix (Hulu-Med's names), the inverse of the conversion.
GITHUB_NAMES = (
    ("model.vision_model.", "model.vision_encoder.vision_encoder."),
    ("model.projector.", "model.mm_projector."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
VISION_ENCODER_DIR = "vision_encoder"
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_channels", "patch_size", "layer_norm_eps", "hidden_act",
                  "attention_dropout")


def github_name(native_key: str) -> str:
    """The GitHub-layout name of a native ``VideoLlama3ForConditionalGeneration`` key."""
    for native, github in GITHUB_NAMES:
        if native_key.startswith(native):
            return github + native_key[len(native):]
    raise ValueError(f"no GitHub name for {native_key!r}")


def _github_config(native: dict[str, Any], text_type: str) -> dict[str, Any]:
    """A 4.51-era Hulu-Med config.json: text fields on top, multimodal fields beside them."""
    text = dict(native["text_config"])
    for key in ("model_type", "rope_parameters", "dtype", "layer_types"):
        text.pop(key, None)
    rope = native["text_config"].get("rope_parameters") or {}
    return {
        **text,
        "architectures": [f"Hulumed{text_type.capitalize()}ForCausalLM"],
        "model_type": f"hulumed_{text_type}",
        "rope_theta": rope.get("rope_theta", 10000.0),
        "torch_dtype": native.get("dtype", "float32"),
        "tie_word_embeddings": native.get("tie_word_embeddings", False),
        "transformers_version": "4.51.2",
        "vision_encoder": VISION_ENCODER_DIR,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -1,
        "image_token_index": native["image_token_id"],
        "use_token_compression": True,
        "mm_attn_implementation": "flash_attention_2",
    }


def _write_encoder_folder(native: dict[str, Any], processor: dict[str, Any], out: Path) -> None:
    vision = native["vision_config"]
    encoder = {k: vision[k] for k in _VISION_FIELDS if k in vision}
    encoder.update(model_type="hulumed_vision_encoder",
                   architectures=["HulumedVisionEncoderModel"])
    video = processor["video_processor"]
    area = (video["patch_size"] * video["merge_size"]) ** 2
    pre = {"image_processor_type": "HulumedImageProcessor", "patch_size": video["patch_size"],
           "min_tokens": video["size"]["shortest_edge"] // area,
           "max_tokens": video["size"]["longest_edge"] // area,
           "image_mean": video["image_mean"], "image_std": video["image_std"], "resample": 3,
           "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True,
           "do_normalize": True, "do_convert_rgb": True}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(encoder, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def _write_tokenizer(native_dir: Path, out: Path) -> None:
    """The native tokenizer as Hulu-Med ships it: template inside tokenizer_config.json, the
    remote processor named, no named image token."""
    shutil.copyfile(native_dir / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((native_dir / "tokenizer_config.json").read_text())
    config.pop("image_token", None)
    config["chat_template"] = (native_dir / "chat_template.jinja").read_text()
    config["processor_class"] = "HulumedProcessor"
    config["auto_map"] = {"AutoProcessor": "processor.HulumedProcessor"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_github_checkpoint(native_dir: str | Path, out_dir: str | Path, *,
                            shards: int = 1) -> Path:
    """Write ``native_dir`` (a native tiny Hulu-Med) in the GitHub layout at ``out_dir``.

    Args:
        native_dir: a folder from ``make_tiny_vlm("hulu_med", ...)`` (one safetensors file).
        out_dir: the folder to create.
        shards: number of safetensors files (more than 1 writes an index).

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import load_file, save_file

    native_dir, out = Path(native_dir), Path(out_dir)
    native = json.loads((native_dir / "config.json").read_text())
    processor = json.loads((native_dir / "processor_config.json").read_text())
    text_type = native["text_config"]["model_type"]
    tensors = {github_name(k): v for k, v in load_file(native_dir / "model.safetensors").items()}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(_github_config(native, text_type), indent=2))
    _write_encoder_folder(native, processor, out / VISION_ENCODER_DIR)
    _write_tokenizer(native_dir, out)
    shutil.copyfile(native_dir / "generation_config.json", out / "generation_config.json")
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                            for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
