"""What ``bench`` reads from a GGUF file for its llama.cpp rows (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np
import pytest

from linearize.bench.llama_cpp import gguf_info


def _gguf(path, tied: bool) -> dict[str, int]:
    """A 2-layer GGUF's metadata and tensors, the output layer its own tensor unless ``tied``;
    the bytes of each tensor by name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    shapes = {"token_embd.weight": (100, 32), "output_norm.weight": (32,)}
    shapes |= {f"blk.{i}.attn_q.weight": (32, 32) for i in range(2)}
    if not tied:
        shapes["output.weight"] = (100, 32)
    for name, shape in shapes.items():
        writer.add_tensor(name, np.ones(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: 4 * int(np.prod(shape)) for name, shape in shapes.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_info_counts_the_weights_a_step_reads(tied, tmp_path):
    """Every tensor but an untied model's embedding table, of which a step reads one row."""
    sizes = _gguf(tmp_path / "m.gguf", tied)
    info = gguf_info(tmp_path / "m.gguf")
    looked_up = 0 if tied else sizes["token_embd.weight"]
    assert info["weight_bytes"] == sum(sizes.values()) - looked_up
    assert (info["layers"], info["kv_heads"], info["head_dim"], info["context"]) == (2, 2, 8, 64)
