"""The request body's JSON: orjson's parse answers what the standard decoder answered (the
same values, the same refusals and messages), on the bodies where the two decoders differ."""

import json

import pytest

from ctr.serving.http.requests import RequestError, _reject_constant, parse_json

SAME_VALUES = [
    b'{"instances": [{"C1": "68fd1e64", "I1": 3, "I2": -0.5, "I3": null}]}',
    # An integer past 64 bits: orjson reads a float, the standard decoder the exact int.
    b'{"instances": [{"C1": 123456789012345678901234567890}]}',
    b'{"ids": true, "instances": [{"C1": -98765432109876543210}]}',
    b'{"instances": [{"C1": 18446744073709551615, "C2": 9223372036854775808}]}',
    b'{"instances": [{"C1": "\\ud800"}]}',  # an escaped lone surrogate
    b'{"instances": [{"I1": 1e400}]}',  # past a double: the standard decoder's inf
    b'{"inputs": {"C1": ' + b"[" * 900 + b"]" * 900 + b"}}",
    b'{"instances": [{"I1": 0.30000001192092896, "I2": -0.0, "I3": 1E-7}]}',
    b'{"a": 1, "a": 2}',
    '{"instances": [{"C1": "caf\u00e9 \u2603"}]}'.encode(),
]


@pytest.mark.parametrize("body", SAME_VALUES)
def test_parse_json_reads_what_the_standard_decoder_reads(body):
    expected = json.loads(body.decode(), parse_constant=_reject_constant)
    got = parse_json(body)
    assert repr(got) == repr(expected)  # repr: an int stays an int, -0.0 stays -0.0


REFUSED = [
    (b'{"instances": [{"C1": "3"', "malformed JSON at line 1 column"),
    (b"\xff\xfe", "not UTF-8"),
    (b"\xef\xbb\xbf{}", "malformed JSON"),  # a byte-order mark
    (b'{"instances": [{"I1": NaN}]}', "NaN is not a JSON number"),
    (b'{"instances": [{"I1": -Infinity}]}', "-Infinity is not a JSON number"),
    (b'{"instances": ' + b"[" * 40_000 + b"]" * 40_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize(("body", "words"), REFUSED)
def test_parse_json_refuses_with_the_standard_decoders_message(body, words):
    with pytest.raises(RequestError) as e:
        parse_json(body)
    assert e.value.status == 400 and words in e.value.message


def test_rows_become_columns_alike_whether_or_not_every_row_holds_every_field():
    from ctr.serving.http.requests import rows_to_columns

    full = [{"a": 1, "b": "x"}, {"b": "y", "a": 2}]
    assert rows_to_columns(full, {"a", "b"}) == {"a": [1, 2], "b": ["x", "y"]}
    ragged = [{"a": 1}, {"b": "y", "a": 2}]
    assert rows_to_columns(ragged, ["a", "b"]) == {"a": [1, 2], "b": [None, "y"]}
    assert rows_to_columns([{"a": 1}], ["a"]) == {"a": [1]}
    assert rows_to_columns([{}], []) == {}
