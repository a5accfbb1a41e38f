import pytest

from ampq import AmpqError, get_format
from ampq.formats import STANDARD_FORMATS


@pytest.mark.parametrize("name", STANDARD_FORMATS)
def test_standard_names_parse_and_keep_their_name(name):
    assert get_format(name).name == name


def test_unknown_format_lists_close_matches():
    with pytest.raises(AmpqError, match=r"unknown format 'imt4-g128'.*int4-g128"):
        get_format("imt4-g128")
    with pytest.raises(AmpqError, match="nf4-b64"):
        get_format("nf4-b46x")


def test_bad_specs_say_what_is_wrong():
    with pytest.raises(AmpqError, match="2 to 8 bits"):
        get_format("int9-g128")
    with pytest.raises(AmpqError, match="granularity"):
        get_format("int4")
    with pytest.raises(AmpqError, match="fp8"):
        get_format("fp8-e3m2")


def test_granularities():
    assert get_format("int4-g128").group_size == 128
    assert get_format("int8-ch").group_size is None
    assert get_format("fp8-e4m3").group_size == 0
    assert get_format("e2m1-b32").group_size == 32
    assert get_format("nf4-b64-dq").group_size == 64
