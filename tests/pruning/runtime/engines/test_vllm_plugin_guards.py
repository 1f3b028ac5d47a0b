"""The 1-D plugin models refuse to build rather than run wrong: without the M-RoPE declaration
(vLLM would number the pruned prompt contiguously) and, for Gemma3, on an attention backend
that ignores the image ranges unless causal image attention was chosen.

The engines are built in one child process with vLLM's engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so each refusal is the exception of ``vllm.LLM``
itself (with the engine core in its own process it is logged there and the parent sees "Engine
core initialization failed").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.cluster import REPO
from tests.helpers.engines import make_engine_tiny, requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow]

CHILD = """
import json, sys
from pruning.runtime.engines.vllm_offline import _prepare_process
from pruning.runtime.engines.vllm_requests import ARCHITECTURES

def main():
    _prepare_process()
    from vllm import LLM
    for family, checkpoint, overrides in json.loads(sys.argv[1]):
        try:
            LLM(model=checkpoint, dtype="float32", enforce_eager=True, max_model_len=512,
                hf_overrides={"architectures": [ARCHITECTURES[family]], **overrides},
                enable_mm_embeds=True, limit_mm_per_prompt={"image": 0},
                kv_cache_memory_bytes=2**28)
            print(json.dumps(["built", family]), flush=True)
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc)]), flush=True)

if __name__ == "__main__":
    main()
"""


def test_plugin_refuses_contiguous_positions_and_ignored_image_ranges(tmp_path):
    hulu = make_engine_tiny("hulu_med", tmp_path / "hulu_med")
    gemma = make_engine_tiny("gemma3", tmp_path / "gemma3")
    attempts = [("hulu_med", str(hulu), {}),  # no M-RoPE declaration
                ("gemma3", str(gemma), {}),
                # declared, but bidirectional (vLLM's default for Gemma3) on the CPU backend
                ("gemma3", str(gemma), {"mrope_section": [1, 1, 1]}),
                ("gemma3", str(gemma), {"mrope_section": [1, 1, 1], "is_mm_prefix_lm": True})]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(attempts)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(attempts), proc.stderr[-3000:]
    contiguous = ("places pruned visual tokens at their original positions, which vLLM only "
                  "takes from a model whose config declares M-RoPE")
    for (kind, message), arch in zip(results[:2], ("HuluMed", "Gemma3"), strict=True):
        assert kind == "ValueError" and f"MedPruner{arch}" in message and contiguous in message
        assert "'mrope_section': [1, 1, 1]" in message and "Refusing" in message
    for kind, message in results[2:]:
        assert kind == "ValueError", message
        assert "attention backend CPU_ATTN ignores vLLM's bidirectional image ranges" in message
        assert "'is_mm_prefix_lm': False" in message and "causal_image_attention" in message
