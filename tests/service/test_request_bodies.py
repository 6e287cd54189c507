"""The recommend routes decode and validate their bodies in pieces (service/body.py); the values
and the errors must be exactly those of json.loads and of validating the whole model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
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
    # Within 64 KiB: one scanner call, errors and all, however deep (it took 63 levels of
    # failed windows and then one element per call: 98 ms on the event loop, against 1.2).
    b"[" * 70 + b"x",
    b"[" * 63 + b"1," * 32000 + b"x" + b"]" * 63,
    b"[" * 100 + b"]" * 100,
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


SEEDS = [
    b'{"requests": [{"history": ["a", "b"], "n": 3}, {"user_id": "u"}], "x": {"y": [1, -2.5e3]}}',
    b' [ {"events": [{"user_id": "u", "item_id": "i", "timestamp": 1}]}, null, true ] ',
]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_one_character_slip_gives_json_loads_error_at_its_position(seed: bytes) -> None:
    # The decoder raises json.decoder's errors itself, with their messages and positions, so
    # that no body is handed to json.loads in one piece (which holds the GIL throughout).
    slips = {seed[:i] + seed[i + 1 :] for i in range(len(seed))}
    slips |= {
        seed[:i] + bytes([c]) + seed[i:] for i in range(len(seed) + 1) for c in b'[]{},:"\\ 1e-'
    }
    for raw in sorted(slips):
        assert outcome(decode_json, raw) == outcome(json.loads, raw), raw


def large_body(rng: np.random.Generator) -> bytes:
    """A batch-like body whose entries straddle the decoder's windows (1 KiB to 64 KiB) and
    runs (16 KiB)."""
    entries = []
    for _ in range(int(rng.integers(1, 6))):
        size = int(rng.choice([10, 200, 3_000, 20_000]))
        # Ids with commas and brackets: a run of elements cut inside one must not decode.
        history = [f"i,{v}]" if v % 3 else int(v) for v in rng.integers(0, 10**6, size)]
        entries.append({"history": history, "n": float(rng.random()), "x": [[1, {"y": "z"}]]})
    return json.dumps({"requests": entries}, separators=(",", ":")).encode()


def test_large_bodies_and_their_slips_decode_as_json_loads() -> None:
    # Containers that fit a window are decoded in one call on it, larger ones element by
    # element: the values, and the errors of a slip anywhere, must not depend on where the
    # windows fall.
    rng = np.random.default_rng(0)
    for _ in range(30):
        raw = large_body(rng)
        assert outcome(decode_json, raw) == outcome(json.loads, raw)
        for at in rng.integers(0, len(raw), 4):
            slip = raw[:at] + bytes([int(rng.choice(list(b'[]{},:"1 ')))]) + raw[at + 1 :]
            assert outcome(decode_json, slip) == outcome(json.loads, slip), (len(raw), at)


def test_large_containers_nested_past_the_depth_limit_are_refused() -> None:
    # A large one is taken apart level by level, and 64 levels is far past any body the routes
    # take (three); a small one is decoded in one call, as json.loads does (BODIES).
    large = b"[" * 65 + b",".join([b"1"] * 40_000) + b"]" * 65
    with pytest.raises(RecursionError):
        decode_json(large)
    within = b"[" * 64 + b",".join([b"1"] * 40_000) + b"]" * 64
    assert decode_json(within) == json.loads(within)


@pytest.mark.parametrize(
    "before",
    [
        b"",
        b'"' + b"7" * 5000 + b'", 0.' + b"1" * 5000 + b", ",  # digits in a string, a fraction
        (b'"' + b"9" * 4300 + b'", ') * 40,  # past a window: decoded in pieces
        b"1, " * 40_000,  # a long list of numbers: in runs
    ],
)
def test_an_integer_too_long_for_python_is_named_where_it_starts(before: bytes) -> None:
    # json.loads raises a ValueError with no position that tells the caller to raise
    # sys.set_int_max_str_digits; finding the number by a search of the text took 8.5 s on
    # 1.7 MB of 4,300-digit strings (the event loop stalled meanwhile).
    raw = b'{"history": [' + before + b"-" + b"9" * 4301 + b', 1], "n": 3}'
    with pytest.raises(json.JSONDecodeError) as caught:
        decode_json(raw)
    assert caught.value.msg == "Integer with more than 4300 digits"
    assert caught.value.pos == raw.index(b"-" + b"9" * 4301)
    with pytest.raises(ValueError, match="Exceeds the limit"):
        json.loads(raw)  # what it stands in for


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
