"""The leakage check flags the non-causal attentions and passes every causal one."""

from __future__ import annotations

import pytest
import torch

from linearize.check import CausalityReport, check_all_causality, check_causality, random_layer
from linearize.layers import ATTENTIONS, attention_config

NONCAUSAL = {("linformer", ()), ("augmented", (("conv", "symmetric"),))}


def test_check_all_covers_the_registry_and_flags_exactly_the_noncausal():
    reports = check_all_causality(length=24)
    assert [r.attention for r in reports] == [*ATTENTIONS, "augmented"]
    for report in reports:
        assert isinstance(report, CausalityReport)
        key = (report.attention, tuple((k, v) for k, v in report.options.items() if k == "conv"))
        assert report.leaks == (key in NONCAUSAL), report
        assert report.leaks == (report.max_change > 1e-9)
        assert report.positions and max(report.positions) <= 22


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_causal_attentions_pass_in_every_form(form):
    for name in ("softmax", "augmented", "flash_global", "sliding_window"):
        report = check_causality(name, form=form, length=24)
        assert not report.leaks and report.max_change <= 1e-9 and report.form == form


def test_options_shrink_windows_unless_given():
    shrunk = check_causality("augmented", length=32, conv="causal")
    assert shrunk.options["size"] == 4 and shrunk.options["conv_size"] == 8
    given = check_causality("augmented", length=32, size=16)
    assert given.options["size"] == 16 and not given.leaks


def test_a_short_symmetric_conv_is_caught():
    """A 3-tap symmetric convolution reads a single token ahead: still caught."""
    report = check_causality("augmented", conv="symmetric", conv_size=3, length=16)
    assert report.leaks


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'nope'"):
        check_causality("nope")
    with pytest.raises(ValueError, match="'sideways'"):
        check_causality("elu", form="sideways")
    with pytest.raises(ValueError, match="not causal.*'chunk'"):
        check_causality("linformer", form="chunk")
    with pytest.raises(ValueError, match="got 1"):
        check_causality("elu", length=1)
    with pytest.raises(ValueError, match="'windows'"):
        check_causality("elu", windows=3)


def test_random_layer_activates_zero_initialised_parts_and_keeps_the_global_seed():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    layer = random_layer("augmented", size=4, conv="causal", conv_size=3)
    assert torch.equal(torch.rand(1), expected)
    assert layer.alpha.item() != 0 and layer.conv.abs().min() > 0
    assert layer.q_proj.weight.dtype == torch.float64
    assert attention_config("augmented").alpha == 0
