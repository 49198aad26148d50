import argparse

import pytest

from hierax.errors import HieraxError
from hierax.sizes import add_size_option, check_size, parse_size, size_from


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["384"], (384, 384)),
        (["384", "512"], (384, 512)),
        (["384x512"], (384, 512)),
        ("256X320", (256, 320)),
        (["224,288"], (224, 288)),
    ],
)
def test_every_spelling_means_h_w(tokens, expected):
    assert parse_size(tokens) == expected


@pytest.mark.parametrize("tokens", [["0"], ["-5"], ["28"], ["384", "512", "640"], ["big"], ["3.5"], ["99999"]])
def test_bad_sizes_are_refused_with_a_message(tokens):
    with pytest.raises(HieraxError, match="--size"):
        parse_size(tokens)


def test_library_sizes_pass_the_same_check():
    assert check_size(64) == (64, 64)
    assert check_size((64, 96)) == (64, 96)
    with pytest.raises(HieraxError):
        check_size(0)
    with pytest.raises(HieraxError):
        check_size((True, 64))


def test_the_option_reads_back_through_size_from():
    parser = argparse.ArgumentParser()
    add_size_option(parser, "input size")
    assert size_from(parser.parse_args(["--size", "384x512"]).size) == (384, 512)
    assert size_from(parser.parse_args(["--size", "384", "512"]).size) == (384, 512)
    assert size_from(parser.parse_args([]).size) is None
    assert size_from((256, 256)) == (256, 256)
