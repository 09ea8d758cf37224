"""`optg.Pattern`: parsing, the text round trip, derived values and errors naming the bad text."""
import pytest

import optg
from optg import Pattern


@pytest.mark.parametrize("text,n,m,target", [("2:4", 2, 4, 0.5), ("1:4", 1, 4, 0.75), (" 4 : 8 ", 4, 8, 0.5),
                                             ("2:8", 2, 8, 0.75)])
def test_nm_parses_with_implied_target(text, n, m, target):
    p = Pattern.parse(text)
    assert (p.kind, p.n, p.m, p.target, p.is_nm, p.is_dense) == ("nm", n, m, target, True, False)
    assert p == Pattern.nm(n, m)
    assert p.density == n / m
    assert str(p) == f"{n}:{m}"
    assert Pattern.parse(str(p)) == p


def test_unstructured_carries_its_target_and_round_trips():
    p = Pattern.parse("unstructured", target=0.9)
    assert (p.kind, p.target, p.n, p.m, p.is_nm) == ("unstructured", 0.9, 0, 0, False)
    assert p == Pattern.unstructured(0.9) != Pattern.unstructured(0.8)
    assert str(p) == "unstructured"
    assert Pattern.parse(str(p), target=p.target) == p
    assert repr(p) == "Pattern.unstructured(0.9)"


def test_dense_and_hashable_frozen_value():
    d = Pattern.parse("dense")
    assert d == Pattern.dense() and str(d) == "dense" and d.target == 0.0 and d.is_dense
    assert len({Pattern.nm(2, 4), Pattern.parse("2:4"), d, Pattern.dense()}) == 2
    with pytest.raises(AttributeError):
        d.kind = "nm"  # frozen


def test_a_pattern_passes_through_parse():
    p = Pattern.nm(2, 4)
    assert Pattern.parse(p) is p
    with pytest.raises(ValueError, match="conflicts"):
        Pattern.parse(p, target=0.5)


@pytest.mark.parametrize("text,target,fragment", [
    ("4:2", None, "N:M pattern needs 1 <= N < M, got 4:2"),
    ("2:2", None, "1 <= N < M, got 2:2"),
    ("0:4", None, "1 <= N < M, got 0:4"),
    ("two-four", None, "N:M pattern must look like '2:4', got 'two-four'"),
    ("2:4:8", None, "'2:4:8'"),
    ("unstructured", None, "pattern 'unstructured' needs target"),
    ("unstructured", 1.0, "must be in [0, 1), got 1.0"),
    ("unstructured", -0.1, "got -0.1"),
    ("2:4", 0.5, "target is implied by pattern '2:4'"),
    ("dense", 0.5, "pattern 'dense' takes no target"),
])
def test_bad_text_raises_value_error_naming_it(text, target, fragment):
    with pytest.raises(ValueError) as err:
        Pattern.parse(text, target=target)
    assert fragment in str(err.value)


@pytest.mark.parametrize("value", [124, True, None])
def test_non_text_is_a_type_error(value):
    with pytest.raises(TypeError, match="pattern must be text"):
        Pattern.parse(value)


def test_constructor_validates_every_kind():
    with pytest.raises(ValueError, match="1 <= N < M"):
        Pattern.nm(3, 2)
    with pytest.raises(ValueError, match="kind must be"):
        Pattern("block")
    with pytest.raises(ValueError, match="no N:M"):
        Pattern("unstructured", n=2, m=4, target=0.5)
    with pytest.raises(ValueError, match="dense pattern has target 0"):
        Pattern("dense", target=0.3)
    assert Pattern("nm", 2, 4, target=0.9).target == 0.5  # N:M's target is always derived


def test_parse_nm_text_helpers_agree_with_pattern():
    assert optg.parse_nm("1:4") == (1, 4)
    assert optg.format_nm(*optg.parse_nm(" 2 : 8 ")) == str(Pattern.parse("2:8"))
