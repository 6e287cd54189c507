"""The recommend routes decode and validate their bodies in pieces (service/body.py); the values
and the errors must be exactly those of json.loads and of validating the whole model."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.body import decode_json, validate_batch
from service.schemas import BatchRequest
from service.settings import Settings

ENTRY = {"history": ["a", "b"], "n": 3}
BODIES = [
    b'{"requests": [{"history": ["a", "b"], "n": 3}, {"user_id": "u"}]}',
    b' \r\n\t{ "requests" :[ {"history":[]} ,{"user_id":"u"} ] , "x" : {"y": [1, 2]} } \n',
    b"{}",
    b"{ }",
    b'{"requests": []}',
    b'{"requests": [ ]}',
    b'{"a": 1, "a": 2, "b": [3], "b": [4, 5]}',  # repeated keys: first place, last value
    b'{"requests": [NaN, Infinity, -Infinity, 1e400, 123456789012345678901234567890]}',
    b'{"requests": ["\\ud800", "\\u00e9", "caf\xc3\xa9"]}',  # a lone surrogate; UTF-8
    b'\xef\xbb\xbf{"requests": []}',  # a UTF-8 BOM
    '{"requests": [{"history": ["x"]}]}'.encode("utf-16"),
    '{"requests": [{"history": ["x"]}]}'.encode("utf-32-le"),
    b'[{"requests": []}]',
    b'"requests"',
    b"null",
    b"12",
    # Syntax errors, anywhere: in an entry, between entries, in keys, at the end.
    b'{"requests": [{"history": ["a",]}]}',
    b'{"requests": [{"history": ["a"]} {"user_id": "u"}]}',
    b'{"requests": [{"history": ["a"]},]}',
    b'{"requests": [{"history": ["a"]}',
    b'{"requests": [{"history": ["a"]}]',
    b'{"requests": [{"history": ["a"]}]}}',
    b'{"requests": [{"history": ["a"]}]} x',
    b'{"requests" [1]}',
    b"{requests: [1]}",
    b'{"requests": [1], }',
    b'{"requests": [01]}',
    b'{"requests": ["a\nb"]}',  # a raw control character in a string
    b'{"re\\quests": [1]}',
    b"{",
    b"",
    b" ",
    b'{"requests": [\xff]}',
    b'{"requests": ["\xff"]}',
    b"\xff\xfe\xfd",
]


def outcome(decode: Any, raw: bytes) -> tuple[str, Any]:
    try:
        value = decode(raw)
    except Exception as exc:
        return type(exc).__name__, (str(exc), getattr(exc, "pos", None))
    # NaN != NaN: compare the JSON text (which writes NaN as NaN) and the key order too.
    return "value", json.dumps(value)


@pytest.mark.parametrize("raw", BODIES)
def test_decoding_in_pieces_matches_json_loads(raw: bytes) -> None:
    assert outcome(decode_json, raw) == outcome(json.loads, raw)


def test_decoding_a_large_batch_matches_json_loads() -> None:
    body = {"requests": [{"history": [f"item-{i}-{j}" for j in range(300)], "n": i + 1}
                         for i in range(50)]}  # fmt: skip
    raw = json.dumps(body, indent=1).encode()
    assert decode_json(raw) == json.loads(raw) == body


def whole(value: Any) -> tuple[str, Any]:
    """What validating the whole model, as FastAPI did, gives."""
    try:
        model = BatchRequest.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        return "errors", [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    return "model", model


def in_pieces(value: Any) -> tuple[str, Any]:
    try:
        return "model", validate_batch(value, Settings())
    except RequestValidationError as exc:
        return "errors", list(exc.errors())


VALUES = [
    {"requests": [ENTRY, {"user_id": "u", "explain": True}]},
    {"requests": [{"user_id": "u"}]},
    {"requests": [ENTRY, {"history": ["a"], "n": 0}, {"history": "a"}, {}, {"n": "5"}]},
    {"requests": [{"history": ["a"], "user_id": "u", "extra": 1}, 7, None, [], "x"]},
    {"requests": [ENTRY], "extra": 1, "more": [2]},
    {"requests": [{"history": [1, None, "a" * 300]}], "extra": 1},
    {"requests": [{"history": ["a"], "diversity": float("nan"), "exclude_history": 1}]},
    {"requests": []},
    {"requests": {"0": ENTRY}},
    {"requests": None},
    {"extra": 1},
    {},
    [ENTRY],
    "body",
    None,
    b'{"requests": []}',  # a body FastAPI hands on as bytes (not sent as JSON)
]


@pytest.mark.parametrize("value", VALUES)
def test_validating_entry_by_entry_matches_the_whole_model(value: Any) -> None:
    got, expected = in_pieces(value), whole(value)
    assert got[0] == expected[0]
    if got[0] == "errors":
        assert got[1] == expected[1]
    else:
        assert got[1] == expected[1]
        # The fields a client left out stay unset: `n` then takes REMI_MAX_N's default.
        sets = [entry.model_fields_set for entry in got[1].requests]
        assert sets == [entry.model_fields_set for entry in expected[1].requests]
