"""Response bodies as JSON bytes, built from the result columns.

`RecommendResponse` and friends in schemas.py document these shapes (OpenAPI); the bodies are
built here as plain dicts and lists and encoded with orjson, because a batch of 256 users with
n=1000 means 256,000 items: as pydantic objects that took seconds, this takes tens of ms. The
keys and their order are the schemas'. These functions run in the compute thread (see
service/batcher.py), never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from service.recommender import Explanation, LoadedModel, Result
from service.schemas import UNKNOWN_IDS_SHOWN, RecommendRequest


def explanation_body(ex: Explanation) -> dict[str, Any]:
    interests = []
    for k, vector in enumerate(ex.interests.tolist()):
        routing = None
        if ex.routing is not None:
            weights = ex.routing[k].tolist()
            routing = [
                {"position": p, "item_id": item, "weight": w}
                for p, (item, w) in enumerate(zip(ex.window, weights, strict=True))
            ]
        interests.append({"interest": k, "vector": vector, "routing": routing})
    return {"window": ex.window, "interests": interests}


def recommend_body(model: LoadedModel, entry: RecommendRequest, result: Result) -> dict[str, Any]:
    """The body of POST /recommend (schemas.RecommendResponse) for one user."""
    if result.scores is None or result.interests is None:
        items = [{"item_id": item, "score": None, "interest": None} for item in result.item_ids]
    else:
        columns = zip(result.item_ids, result.scores, result.interests, strict=True)
        items = [{"item_id": item, "score": s, "interest": k} for item, s, k in columns]
    return {
        "model_version": model.version,
        "user_id": entry.user_id,
        "fallback": result.fallback,
        "items": items,
        "unknown_ids": result.unknown_ids[:UNKNOWN_IDS_SHOWN],
        "unknown_count": len(result.unknown_ids),
        "known_history_length": result.known_count,
        "explain": None if result.explanation is None else explanation_body(result.explanation),
    }


def recommend_json(model: LoadedModel, entry: RecommendRequest, result: Result) -> bytes:
    return orjson.dumps(recommend_body(model, entry, result))


def batch_json(
    model: LoadedModel, entries: Sequence[RecommendRequest], results: Sequence[Result]
) -> bytes:
    """The body of POST /recommend/batch (schemas.BatchResponse).

    Encoded user by user and joined, so no single orjson call (which holds the GIL) runs long
    enough to stall the event loop's thread; bytes.join copies tens of MB (256 users, n=1000)
    without the GIL, where `+` would hold it.
    """
    parts = [recommend_json(model, e, r) for e, r in zip(entries, results, strict=True)]
    head = b'{"model_version":' + orjson.dumps(model.version) + b',"results":['
    return b"".join([head, b",".join(parts), b"]}"])
