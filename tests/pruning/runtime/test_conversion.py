"""``medpruner convert hulu-med``: a tiny checkpoint in Hulu-Med's GitHub layout -> native folder.

The GitHub-layout checkpoint is written from a tiny native one by renaming its keys backwards
(:mod:`pruning.testing.hulu_github`, built from the spec's key names and config fields), so every
converted tensor can be compared with the one it came from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.cli import main as cli
from pruning.testing import make_tiny_vlm, write_github_checkpoint
from pruning.testing.hulu_github import github_name

PROMPT = "Describe the liver."


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _volume(depth: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(40.0, 250.0, (depth, 40, 40)).astype(np.float32)


@pytest.fixture(scope="module")
def native(tiny_checkpoints) -> Path:
    return tiny_checkpoints["hulu_med"]


@pytest.fixture(scope="module")
def github(native, tmp_path_factory) -> Path:
    """A single-file GitHub-layout checkpoint of the tiny native Hulu-Med."""
    return write_github_checkpoint(native, tmp_path_factory.mktemp("gh") / "src")


def _convert(src: Path, dst: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli(["convert", "hulu-med", str(src), str(dst), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_same_model(native: Path, converted: Path) -> None:
    """Same keys, dtypes and values; load_vlm gives identical logits and text."""
    from pruning.runtime.vlm import load_vlm

    want, got = _tensors(native), _tensors(converted)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    a, b = load_vlm(native), load_vlm(converted)
    vol = _volume()
    pa, pb = a.prepare_batch([vol], [PROMPT]), b.prepare_batch([vol], [PROMPT])
    assert torch.equal(pa.inputs["input_ids"], pb.inputs["input_ids"])
    assert torch.equal(a.logits(pa), b.logits(pb))
    assert a.generate(vol, PROMPT, max_new_tokens=5).text == \
        b.generate(vol, PROMPT, max_new_tokens=5).text


def test_github_layout_keys_follow_the_spec(github):
    keys = set(_tensors(github))
    for key in ("model.vision_encoder.vision_encoder.embeddings.patch_embedding.weight",
                "model.vision_encoder.vision_encoder.encoder.layers.1.self_attn.q_proj.weight",
                "model.vision_encoder.vision_encoder.post_layernorm.weight",
                "model.mm_projector.readout.0.weight", "model.mm_projector.readout.2.bias",
                "model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                "model.norm.weight", "lm_head.weight"):
        assert key in keys, key
    assert not any("inv_freq" in k for k in keys)
    config = json.loads((github / "config.json").read_text())
    assert config["model_type"] == "hulumed_qwen2" and "rope_theta" in config
    assert "torch_dtype" in config and "rope_parameters" not in config


def test_sharded_checkpoint_converts_loads_and_equals_its_source(native, tmp_path, capsys):
    src = write_github_checkpoint(native, tmp_path / "src", shards=2)
    code, out, err = _convert(src, tmp_path / "dst", capsys)
    assert code == 0, err
    assert "67 tensors from the github layout" in out
    dst = tmp_path / "dst"
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(
        p.name for p in src.glob("*.safetensors"))
    source = _tensors(src)
    for key, tensor in _tensors(dst).items():  # each converted tensor equals its source
        assert torch.equal(tensor, source[github_name(key)]), key
    config = json.loads((dst / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 1000000.0
    assert config["image_token_id"] == json.loads((src / "config.json").read_text())[
        "image_token_index"]
    tokenizer = json.loads((dst / "tokenizer_config.json").read_text())
    assert tokenizer["image_token"] == "<image>" and "auto_map" not in tokenizer
    assert not list(tmp_path.glob(".dst.converting-*"))
    _assert_same_model(native, dst)


def test_qwen3_language_model_converts(tmp_path, capsys):
    native = make_tiny_vlm("hulu_med", tmp_path / "native",
                           text_config={"model_type": "qwen3", "head_dim": 32})
    src = write_github_checkpoint(native, tmp_path / "src")
    assert json.loads((src / "config.json").read_text())["model_type"] == "hulumed_qwen3"
    code, _, err = _convert(src, tmp_path / "dst", capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen3"
    _assert_same_model(native, tmp_path / "dst")


def test_vision_encoder_folder_from_the_option(github, native, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(github, src)
    shutil.move(src / "vision_encoder", tmp_path / "encoder")
    config = json.loads((src / "config.json").read_text())
    config["vision_encoder"] = "ZJU-AI4H/hulumed-siglip"  # a hub id: not a folder under SRC
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = _convert(src, tmp_path / "dst", capsys)
    assert code == 1 and "pass --vision-encoder DIR" in err
    code, _, err = _convert(src, tmp_path / "dst", capsys, "--vision-encoder",
                            str(tmp_path / "encoder"))
    assert code == 0, err
    assert torch.equal(_tensors(tmp_path / "dst")["lm_head.weight"],
                       _tensors(native)["lm_head.weight"])


def test_rotary_inv_freq_is_never_copied(github, native, tmp_path, capsys):
    """A checkpoint that saved the vision rotary buffer (uninitialised under transformers 5):
    dropped, and the native class computes it."""
    src = tmp_path / "src"
    shutil.copytree(github, src)
    key = "model.vision_encoder.vision_encoder.encoder.rotary_pos_emb.inv_freq"
    _edit_weights(src, lambda t: t.update({key: torch.full((4,), 1e37)}))
    code, out, err = _convert(src, tmp_path / "dst", capsys)
    assert code == 0, err
    assert not any("inv_freq" in k for k in _tensors(tmp_path / "dst"))
    from pruning.runtime.vlm import load_vlm

    rotary = load_vlm(tmp_path / "dst").model.model.vision_model.rotary_pos_emb
    assert torch.equal(rotary.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_weights(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _rename_vision(tensors: dict) -> None:
    for key in [k for k in tensors if k.startswith("model.vision_encoder.vision_encoder.")]:
        tensors["model.vision_tower." + key.split(".", 3)[3]] = tensors.pop(key)


BROKEN = {
    "unknown model_type": (lambda s: _edit_config(s, model_type="llava_qwen2"),
                           "unknown checkpoint layout: model_type 'llava_qwen2'"),
    "unknown key names": (lambda s: _edit_weights(s, _rename_vision),
                          "unknown checkpoint layout: model_type 'hulumed_qwen2', weight keys "),
    "missing key": (lambda s: _edit_weights(
        s, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "missing weight 'model.layers.1.mlp.up_proj.weight'"),
    "shape mismatch": (lambda s: _edit_weights(s, lambda t: t.update(
        {"model.mm_projector.readout.0.weight": torch.zeros(64, 16)})),
        "shape mismatch: 'model.mm_projector.readout.0.weight' is [64, 16], native "
        "'model.projector.readout.0.weight' needs [64, 32]"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "no model.safetensors or "),
    "no image token": (lambda s: _edit_config(s, image_token_index=None),
                       "image_token_index None is not a token id"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_one_line_nonzero_and_leaves_no_dst(github, tmp_path, capsys, case):
    src = tmp_path / "src"
    shutil.copytree(github, src)
    breaker, message = BROKEN[case]
    breaker(src)
    code, out, err = _convert(src, tmp_path / "dst", capsys)
    assert code == 1
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("medpruner convert: ") and message in err, err
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left


def test_existing_dst_is_refused(github, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    code, _, err = _convert(github, tmp_path / "dst", capsys)
    assert code == 1 and "already exists" in err
    assert list((tmp_path / "dst").iterdir()) == []


def test_command_line_exit_status(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "hulumed_qwen2"}))
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", "hulu-med",
                          str(tmp_path / "src"), str(tmp_path / "dst")],
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"medpruner convert: no model.safetensors or model.safetensors.index.json in "
        f"{tmp_path / 'src'} (found weight files [])"]
    assert not (tmp_path / "dst").exists()
