"""Which layers are pruned and how sparse: layer choice, sparsity specs and their one parser."""

from __future__ import annotations

import re

import pytest
from nets import Tiny

from spade_lib import config
from spade_lib.schedules import (
    LinearSchedule,
    OnlyBlocks,
    default_layers,
    linear,
    only,
    parse_spec,
    resolve_sparsity,
    select_layers,
)


def test_default_layers_skip_stem_and_grouped_convs():
    assert default_layers(Tiny()) == ["conv", "conv2", "fc"]


def test_select_layers_by_pattern_and_validation():
    model = Tiny()
    assert select_layers(model, "conv*") == ["conv", "conv2"]
    assert select_layers(model, ["fc", "stem"]) == ["stem", "fc"]
    with pytest.raises(ValueError, match="'block9.*'.*valid layers: stem, conv, conv2, fc"):
        select_layers(model, ["block9.*"])


def test_resolve_sparsity_specs():
    model = Tiny()
    assert resolve_sparsity(model, 0.5) == {"conv": 0.5, "conv2": 0.5, "fc": 0.5}
    assert resolve_sparsity(model, {"fc": 0.9}) == {"conv": 0.0, "conv2": 0.0, "fc": 0.9}
    assert resolve_sparsity(model, linear()) == pytest.approx(
        {"conv": 0.0, "conv2": 0.495, "fc": 0.99})
    assert resolve_sparsity(model, "linear:0.2:0.8") == pytest.approx(
        {"conv": 0.2, "conv2": 0.5, "fc": 0.8})
    assert resolve_sparsity(model, only("conv2", 0.9)) == {"conv": 0.0, "conv2": 0.9, "fc": 0.0}
    assert resolve_sparsity(model, "only:conv,fc:0.6") == {"conv": 0.6, "conv2": 0.0, "fc": 0.6}
    assert resolve_sparsity(model, 0.3, ["fc"]) == {"fc": 0.3}
    assert resolve_sparsity(model, linear(), ["fc"]) == {"fc": 0.99}


def test_sparsity_dict_keys_may_be_block_prefixes(model):
    names = default_layers(model)
    got = resolve_sparsity(model, {"layers.2": 0.5, "layers.2.0.conv1": 0.9, "fc": 0.8})
    for name, value in got.items():
        if name == "layers.2.0.conv1":
            assert value == 0.9  # the longest key wins
        elif name.startswith("layers.2."):
            assert value == 0.5
        elif name == "fc":
            assert value == 0.8
        else:
            assert value == 0.0
    assert list(got) == names and sum(v == 0.5 for v in got.values()) > 1


def test_resolve_sparsity_rejects_bad_specs():
    model = Tiny()
    with pytest.raises(ValueError, match="'conv3'.*block prefixes of: conv, conv2, fc"):
        resolve_sparsity(model, {"conv3": 0.5})
    with pytest.raises(ValueError, match="'con'.*block prefixes of: conv, conv2, fc"):
        resolve_sparsity(model, {"con": 0.5})  # a prefix covers whole name components only
    with pytest.raises(ValueError, match="sparsity of 'fc' 1.0.*\\[0, 1\\)"):
        resolve_sparsity(model, {"fc": 1.0})
    with pytest.raises(ValueError, match="'layers.9'.*valid layers"):
        resolve_sparsity(model, only("layers.9", 0.5))
    with pytest.raises(ValueError, match="unknown sparsity spec 'cubic'"):
        resolve_sparsity(model, "cubic")
    with pytest.raises(ValueError, match="last 1.2"):
        linear(0.0, 1.2)
    with pytest.raises(ValueError, match="'dw'"):
        resolve_sparsity(model, 0.5, ["dw"])


def test_parse_spec_reads_the_config_strings():
    assert parse_spec("linear") == LinearSchedule(0.0, 0.99)
    assert parse_spec("linear:0.2:0.8") == LinearSchedule(0.2, 0.8)
    assert parse_spec("only:layers.1,fc:0.5") == OnlyBlocks(("layers.1", "fc"), 0.5)


@pytest.mark.parametrize("spec", [
    "linear", "linear:0.1:0.9", "linear:0:0", "only:conv,fc:0.5", "only:a,,b:0.5",
    "cubic", "linear:0.1", "linear:0:1.2", "linear:a:0.5", "linear:nan:0.5", "only::0.5",
    "only:conv:1", "only:conv", "LINEAR", "",
])
def test_config_checks_sparsity_strings_with_the_same_parser(spec):
    """The config accepts exactly the strings the schedule parser accepts, with its message."""
    try:
        parse_spec(spec)
    except ValueError as e:
        with pytest.raises(ValueError, match="config key 'sparsity': " + re.escape(str(e))):
            config.from_dict({"sparsity": spec})
    else:
        assert config.from_dict({"sparsity": spec}).sparsity == spec

