"""The catalog embedding file is byte-reproducible: DVC hashes bytes, so equal tables must be equal files."""

from __future__ import annotations

import torch
from safetensors import safe_open

from molar.embed_cache import TENSOR, load_catalog_embeddings, save_catalog_embeddings


def test_equal_tables_write_identical_bytes_that_still_load(tmp_path):
    table = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    table[0] = 0
    # safetensors orders metadata by a hash map with a fresh seed per write: with 4 keys, a single
    # repeat could match by chance (1 in 24); eight writes all matching by chance is 1 in 24**7
    paths = [tmp_path / f"items{i}.safetensors" for i in range(8)]
    for path in paths:
        save_catalog_embeddings(path, table, key="k1", checkpoint=tmp_path / "modèle")  # non-ASCII path
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])

    assert torch.equal(load_catalog_embeddings(paths[0], key="k1"), table)
    assert load_catalog_embeddings(paths[0], key="k2") is None
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {"key": "k1", "checkpoint": str(tmp_path / "modèle"), "n_items": "4", "hidden_size": "3"}
        assert list(f.keys()) == [TENSOR]
    assert int.from_bytes(first[:8], "little") % 8 == 0  # the format's header alignment
