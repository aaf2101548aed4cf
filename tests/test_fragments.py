"""Streaming DiLoCo's fragments: whole layers, contiguous, of about equal size (sizes worked out by hand)."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_localsgd.algorithms.fragments import layer_units, split_into_fragments


def cut(module: nn.Module, fragments: int) -> list[list[str]]:
    params = list(module.parameters())
    names = {id(p): n for n, p in module.named_parameters()}
    assignment = split_into_fragments(params, names, fragments)
    out: list[list[str]] = [[] for _ in range(fragments)]
    for name, p in module.named_parameters():
        out[assignment[id(p)]].append(name)
    return out


def test_a_layers_weight_and_bias_are_one_unit_and_units_keep_their_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    names = {id(p): n for n, p in model.named_parameters()}
    units = layer_units(list(model.parameters()), names)
    assert [[names[id(p)] for p in unit] for unit in units] == [["0.weight", "0.bias"], ["2.weight"]]


def test_an_embedding_heavy_model_gives_the_embedding_a_fragment_and_shares_the_rest_evenly():
    # sizes: 1000 (embedding), then four layers of 110, then a head of 101: 1541 in all
    model = nn.Sequential(nn.Embedding(100, 10), *[nn.Linear(10, 10) for _ in range(4)], nn.Linear(10, 1, bias=True))
    parts = cut(model, 3)
    # share 513.7: the embedding (1000) is alone; then 541 over 2 fragments, share 270.5: 110 + 110 = 220 falls short
    # by 50.5, a third layer (330) would overshoot by 59.5, so two layers, and the rest (220 + 11 = 231)
    assert parts == [
        ["0.weight"],
        ["1.weight", "1.bias", "2.weight", "2.bias"],
        ["3.weight", "3.bias", "4.weight", "4.bias", "5.weight", "5.bias"],
    ]


def test_every_fragment_gets_a_layer_even_when_the_last_layers_are_tiny():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(1, 1), nn.Linear(1, 1))
    assert [len(part) for part in cut(model, 3)] == [2, 2, 2]


def test_more_fragments_than_layers_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`fragments=3` is more than the 2 layer"):
        cut(model, 3)
