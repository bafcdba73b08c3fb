"""Policy dataclasses: construction, validation, schedules, dict and spec round trips."""
import dataclasses

import pytest

import vtprune
from vtprune import PiToMe, ToMe
from vtprune.policy import parse_spec
from vtprune.registry import make_policies
from vtprune.schedules import pitome_uses_bsm, tome_schedule


@pytest.mark.parametrize("policy", [
    ToMe(), ToMe(r=8), ToMe(r=16, inflect=-1.0), ToMe(r=[4, 4, 2]), ToMe(r=13, prop_attn=False),
    PiToMe(), PiToMe(ratio=0.975), PiToMe(ratio=0.9, margin_start=0.9, margin_slope=0.9, bsm_layers="none",
                                          metric="hidden", prop_attn=True),
])
def test_round_trips(policy):
    assert vtprune.make_policy(policy.to_spec()) == policy
    assert vtprune.Policy.from_dict(policy.to_dict()) == policy
    assert type(policy).from_dict(policy.to_dict()) == policy
    assert dataclasses.replace(policy) == policy
    hash(policy)


def test_spec_strings():
    assert ToMe(r=16).to_spec() == "tome:r=16"
    assert ToMe().to_spec() == "tome:r=16"
    assert PiToMe(ratio=0.9).to_spec() == "pitome:ratio=0.9"
    assert PiToMe(ratio=0.95).to_spec() == "pitome:ratio=0.95"
    assert ToMe(r=[8, 4]).to_spec() == "tome:r=[8,4]"
    assert ToMe(r=13, prop_attn=False).to_spec() == "tome:r=13,prop_attn=false"
    assert vtprune.make_policy("tome:r=(16,-1)") == ToMe(r=16, inflect=-1.0)
    assert vtprune.make_policy("TOME: r = 8 , prop_attn = False") == ToMe(r=8, prop_attn=False)
    assert vtprune.make_policy("pitome", ratio=0.8) == PiToMe(ratio=0.8)
    assert vtprune.make_policy("tome:r=4", r=8) == ToMe(r=8)
    assert parse_spec("tome:r=[1,2],prop_attn=true") == ("tome", {"r": [1, 2], "prop_attn": True})
    assert str(ToMe(r=8)) == "tome:r=8"


def test_tome_r_forms():
    assert ToMe(r=(16, -1)) == ToMe(r=16, inflect=-1.0)
    assert ToMe(r=(16, -1.0)).schedule(12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert ToMe(r=(8, 0.5)).inflect == 0.5
    assert ToMe(r=(16, 1)) == ToMe(r=16, inflect=1.0)  # any tuple is (r, inflect), as in parse_r
    assert ToMe(r=[16, 1]).schedule(3) == [16, 1, 0]
    assert ToMe(r=[25] * 8).schedule(12) == [25] * 8 + [0] * 4
    assert ToMe(r=[1, 2, 3]).schedule(2) == [1, 2]
    assert ToMe(r=[8, 4]).r == (8, 4)  # a list is per-layer, stored as a tuple
    assert ToMe(r=16).schedule(12) == [16] * 12


def test_tome_schedule_matches_parse_r():
    # ToMe's parse_r: lo = int(r(1-inflect)), hi = 2r - lo, layer i: int(lo + i(hi-lo)/(L-1))
    assert tome_schedule(12, 8, -1.0) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert tome_schedule(12, 16, 1.0) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert tome_schedule(1, 16, -1.0) == [32]  # the official code divides by zero here


def test_pitome_variant_map():
    assert [pitome_uses_bsm(layer, 12, "first_half") for layer in range(12)] == [True] * 6 + [False] * 6
    assert [pitome_uses_bsm(layer, 5, "first_half") for layer in range(5)] == [True] * 3 + [False] * 2
    assert [pitome_uses_bsm(layer, 5, "second_half") for layer in range(5)] == [False] * 3 + [True] * 2
    assert PiToMe().margin(6, 12) == 0.75 - 0.75 * (6 / 12)


@pytest.mark.parametrize("make, message", [
    (lambda: ToMe(r=-1), r"tome: r must be an integer >= 0, got -1"),
    (lambda: ToMe(r=2.5), r"tome: r must be an integer >= 0, got 2.5"),
    (lambda: ToMe(r=True), r"tome: r must be an integer >= 0"),
    (lambda: ToMe(r=[4, -2]), r"tome: r\[1\] must be an integer >= 0, got -2"),
    (lambda: ToMe(r=[]), r"must not be empty"),
    (lambda: ToMe(r=(1, 2, 3)), r"a tuple r is ToMe's \(r, inflect\) pair.*Pass a list"),
    (lambda: ToMe(r=(16, -1), inflect=0.5), r"either inside r=\(r, inflect\) or as inflect="),
    (lambda: ToMe(r=16, inflect=1.5), r"tome: inflect must be in \[-1.0, 1.0\], got 1.5"),
    (lambda: ToMe(r=[4, 4], inflect=0.5), r"inflect applies to a constant r"),
    (lambda: ToMe(prop_attn="yes"), r"tome: prop_attn must be true or false"),
    (lambda: PiToMe(ratio=0.0), r"pitome: ratio must be in \(0.0, 1.0\], got 0.0"),
    (lambda: PiToMe(ratio=1.2), r"pitome: ratio must be in \(0.0, 1.0\], got 1.2"),
    (lambda: PiToMe(ratio="0.9"), r"pitome: ratio must be a number in \(0.0, 1.0\]"),
    (lambda: PiToMe(bsm_layers="half"), r"pitome: bsm_layers must be one of 'first_half', 'second_half', 'all', 'none'"),
    (lambda: PiToMe(metric="queries"), r"pitome: metric must be one of 'keys', 'hidden'"),
    (lambda: PiToMe(alpha=0), r"pitome: alpha must be in \(0.0, inf\]"),
    (lambda: PiToMe(margin_start=2), r"pitome: margin_start must be in \[-1.0, 1.0\]"),
    (lambda: vtprune.make_policy("tome:r16"), r"malformed argument 'r16'.*key=value"),
    (lambda: vtprune.make_policy(""), r"non-empty string"),
    (lambda: vtprune.make_policy("tome:q=3"), r"bad arguments for policy 'tome'.*q"),
    (lambda: vtprune.make_policy(ToMe(), r=3), r"keyword arguments \['r'\] were given with a policy object"),
    (lambda: vtprune.Policy.from_dict({"r": 3}), r"needs a 'policy' key"),
    (lambda: ToMe.from_dict({"policy": "pitome"}), r"describes policy 'pitome', not 'tome'"),
    (lambda: make_policies([]), r"no policy given"),
])
def test_bad_arguments_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_non_policy_type_raises_type_error():
    with pytest.raises(TypeError, match="a policy must be a Policy object"):
        vtprune.make_policy(3.5)


def test_policies_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ToMe().r = 3


def test_pitome_presets_follow_the_official_patches():
    assert PiToMe.preset("deit") == PiToMe()
    assert PiToMe.preset("mae", ratio=0.95) == PiToMe(ratio=0.95, bsm_layers="second_half")
    clip = PiToMe.preset("clip", ratio=0.9)
    assert (clip.metric, clip.margin(0, 24), clip.bsm_layers, clip.prop_attn) == ("hidden", 0.95, "none", False)
    assert PiToMe.preset("blip").margin(6, 12) == 0.9 - 0.9 * 0.5
    blip2 = PiToMe.preset("blip2")
    assert (blip2.margin(39, 40), blip2.prop_attn) == (0.75 - 0.4 * 39 / 40, True)
    clip_hf = PiToMe.preset("clip_hf", ratio=0.9)
    assert (clip_hf.metric, clip_hf.bsm_layers, clip_hf.bsm, clip_hf.placement, clip_hf.merge) == (
        "hidden", 13, "tome", "post", "mean")
    assert clip_hf.margin(12, 24) == 0.9 - 0.9 * 12 / 24
    with pytest.raises(ValueError, match="unknown preset 'nope'.*deit, mae, clip, blip, blip2, clip_hf"):
        PiToMe.preset("nope")
    with pytest.raises(ValueError, match="placement must be one of 'mid', 'post'"):
        PiToMe(placement="after")
