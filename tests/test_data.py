"""data.py units: which batches a rank gets, and where the input sits in a batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bntool.data import first_input, shard_batches
from bntool.errors import InputError


@given(n=st.integers(0, 200), batch=st.integers(1, 32), world=st.integers(1, 5))
def test_shards_partition_the_single_process_batches(n, batch, world):
    """Every rank's batches together are exactly the batches one process would see, each once, in order."""
    single = [range(s, min(s + batch, n)) for s in range(0, n, batch)]
    shards = [shard_batches(n, batch, (rank, world)) for rank in range(world)]
    assert sorted((r for shard in shards for r in shard), key=lambda r: r.start) == single
    for rank, shard in enumerate(shards):
        assert shard == single[rank::world]


def test_shard_sizes_differ_by_at_most_one_batch():
    sizes = [len(shard_batches(100, 8, (rank, 3))) for rank in range(3)]  # 13 batches over 3 ranks
    assert sizes == [5, 4, 4]


def test_first_input_of_tensors_tuples_and_dicts():
    x = torch.randn(2, 3)
    assert first_input(x) is x
    assert first_input((x, torch.tensor([1, 0]))) is x  # (input, label)
    assert first_input([[x], "meta"]) is x
    assert first_input({"pixel_values": x, "labels": torch.tensor([0, 1])}) is x
    assert first_input({"image": x}) is x
    assert first_input({"feat": x, "other": torch.zeros(1)}, input_key="feat") is x
    assert first_input({"inputs": (x, 1)}) is x


def test_first_input_errors_name_the_problem():
    with pytest.raises(InputError, match="keys"):
        first_input({"feat": torch.zeros(1)})
    with pytest.raises(InputError, match="str"):
        first_input("not a batch")
    with pytest.raises(InputError):
        first_input(())
