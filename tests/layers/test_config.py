"""The attention registry and its config: bad input fails early, naming the value."""

from __future__ import annotations

import pytest
import torch

import linearize
from linearize.layers import ABLATIONS, ATTENTIONS, AttentionConfig, attention_config
from tests.helpers import TINY, tiny_layer

SHAPE = {"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2}


def test_registry_lists_every_preset():
    assert linearize.list_attentions() == list(ATTENTIONS)
    assert {"softmax", "linformer", "flash_local", "flash_global", "augmented"} <= set(ATTENTIONS)


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_every_preset_builds_and_round_trips(name):
    config = attention_config(name, **SHAPE)
    assert config.name == name
    assert AttentionConfig.from_dict(config.to_dict()) == config
    layer = linearize.build_attention(name, **SHAPE)
    assert layer.is_causal == config.is_causal


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_builds(ablation):
    layer = tiny_layer("augmented", **ABLATIONS[ablation])
    y, _ = layer(torch.randn(1, 7, TINY["hidden_size"], dtype=torch.float64))
    assert y.shape == (1, 7, TINY["hidden_size"])


def test_unknown_attention_lists_valid_names():
    with pytest.raises(ValueError, match="'cosformer'") as error:
        linearize.build_attention("cosformer", **SHAPE)
    for name in ATTENTIONS:
        assert repr(name) in str(error.value)


BAD_OPTIONS = {
    "group-size-0": ("flash_local", {"size": 0}, "group size must be >= 1, got 0"),
    "group-size-negative": ("augmented", {"size": -3}, "got -3"),
    "window-size-0": ("sliding_window", {"size": 0}, "size >= 1, got 0"),
    "conv-size-0": ("augmented", {"conv": "causal", "conv_size": 0}, "conv_size.*got 0"),
    "heads-not-multiple": ("elu", {"num_kv_heads": 3}, "num_heads=4.*num_kv_heads=3"),
    "unknown-option": ("elu", {"group_size": 8}, "'group_size'"),
    "unknown-feature-map": ("elu", {"feature_map": "cosine"}, "'cosine'"),
    "chunk-size-0": ("augmented", {"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    "unknown-kind": ("elu", {"kind": "kernel"}, "'kernel'"),
}


@pytest.mark.parametrize(("name", "options", "match"), BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_bad_options_name_the_value(name, options, match):
    with pytest.raises(ValueError, match=match):
        linearize.build_attention(name, **{**SHAPE, **options})


def test_unknown_form_names_the_value():
    layer = tiny_layer("elu")
    with pytest.raises(ValueError, match="'sequential'.*allowed"):
        layer(torch.randn(1, 3, TINY["hidden_size"], dtype=torch.float64), form="sequential")


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"name": "augmented"}),
        (["--conv-size", "8"], {"name": "augmented", "conv": "causal", "conv_size": 8}),
        (
            ["--conv-size", "8", "--option", "conv=none"],
            {"name": "augmented", "conv": "none", "conv_size": 8},
        ),
    ],
)
def test_conv_size_turns_the_conv_on_unless_an_option_says(argv, expected):
    """The preset has no conv on V: giving its taps asks for it; an explicit option wins."""
    import argparse

    from linearize.cli.options import add_attention_arguments, attention_from_args

    parser = argparse.ArgumentParser()
    add_attention_arguments(parser)
    spec = attention_from_args(parser.parse_args(["--attention", "augmented", *argv]))
    assert spec == expected
    assert attention_config(**spec).conv == expected.get("conv", "none")
