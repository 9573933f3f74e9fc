"""``p2p.maps``: attention-map geometry from the latent."""

from __future__ import annotations

import pytest

from nti_lightning.p2p.maps import coarse_queries, map_shape, pick_attention_queries, store_queries


def test_attention_geometry_from_the_latent():
    assert map_shape(16, (16, 16)) == (4, 4) and map_shape(8, (8, 16)) == (2, 4)
    assert pick_attention_queries([256, 64, 16, 4], (16, 16)) == 16  # tiny 128 px: 4×4 (= SD's 16 of 64)
    assert pick_attention_queries([4096, 1024, 256, 64], (64, 64)) == 256  # SD 512 px: 16×16
    assert pick_attention_queries([256, 64], (16, 16)) == 64  # closest existing
    assert pick_attention_queries([256, 64, 16], (16, 16), side=8) == 64
    with pytest.raises(ValueError, match="side 3"):
        pick_attention_queries([256, 64], (16, 16), side=3)


def test_coarse_layers_are_a_quarter_of_the_latent():
    assert coarse_queries((64, 64)) == 1024  # SD 512 px: 32×32 and coarser (the authors' self-attention rule)
    assert coarse_queries((8, 8)) == 16 and coarse_queries((8, 16)) == 32
    assert store_queries((8, 8)) == 16
    assert store_queries((8, 8), attention_side=8) == 64  # a finer figure needs the finer maps stored
    assert store_queries((8, 8), attention_side=2) == 16
