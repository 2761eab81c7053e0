"""Request parsing for ``POST /v1/predict``: the body, its rows or columns, and ids mode.

Everything here runs on arrival (on the event loop, or a thread for ids), before a request is
queued; each refusal is a :class:`RequestError` with its HTTP status and a one-line message
naming the field: malformed JSON 400, unknown field / wrong type / ragged columns 400, body
over the limit 413, too many rows 413, non-JSON content type 415.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request

from datasets.encode import EncodedRecords

if TYPE_CHECKING:
    from ctr.serving.http.models import Served

JSON_TYPES = ("application/json",)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a one-line ``message``, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _reject_constant(name: str) -> Any:
    raise RequestError(400, f"{name} is not a JSON number; send finite numbers or null")


# 20 digits in a row: an integer orjson would read as a float (it keeps 64 bits), where the
# standard decoder keeps the exact int; such a body takes the standard decoder. Found as a run
# of "0" in the body with every digit made "0" and every other byte " ": two C passes, ~15x
# faster than a regular expression's search.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_DIGITS = b"0" * 20


def check_media(content_type: str, content_length: str | None, limit: int) -> None:
    """The request's declared content type and length (415, 413) before its body is read."""
    media = content_type.split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise RequestError(415, f"content type {media or 'none'!r}; send application/json")
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestError(413, f"body of {int(content_length)} bytes exceeds the limit of {limit}")


def parse_json(body: bytes) -> Any:
    """A request body -> its JSON value, as :func:`json.loads` with non-finite constants
    refused reads it (the same values: ints stay ints, floats the nearest double).

    orjson parses; any body it refuses is parsed again by the standard decoder, which names
    the error (line and column) or takes what orjson alone refuses (an escaped lone
    surrogate, a number beyond a double's range)."""
    if _LONG_DIGITS not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        # Decoded explicitly: json.loads(bytes) would also guess UTF-16/32 from a BOM.
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(
            400, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 ({e.reason})") from None
    except RecursionError:
        # No request nests deeper than rows of lists of values; json gives up far deeper.
        raise RequestError(400, "malformed request: JSON nested too deeply") from None


async def read_body(chunks: Iterable[bytes] | Any, limit: int) -> bytes:
    """The body from an async iterator of chunks, refused (413) once over ``limit`` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    """A Starlette request's JSON body, its content type and size checked first."""
    check_media(
        request.headers.get("content-type", ""), request.headers.get("content-length"), limit
    )
    return parse_json(await read_body(request.stream(), limit))


def request_columns(
    payload: Any, accepted: set[str], max_rows: int, keep_rows: bool = False
) -> tuple[dict, int, bool]:
    """Validates a parsed request body -> (field -> list of values, rows, ids mode).

    With ``keep_rows``, a raw (not ids) rows-form body is validated but left as rows: the
    first item is then :class:`Rows`, turned into columns with the rest of its batch."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object with 'instances' or 'inputs'")
    unknown = sorted(set(payload) - {"instances", "inputs", "ids"})
    if unknown:
        raise RequestError(
            400, f"unknown field {unknown[0]!r} in the request; expected instances, inputs, ids"
        )
    ids = payload.get("ids", False)
    if not isinstance(ids, bool):
        raise RequestError(400, f"field 'ids': expected true or false, got {_kind(ids)}")
    if ("instances" in payload) == ("inputs" in payload):
        raise RequestError(400, "give exactly one of 'instances' (rows) or 'inputs' (columns)")
    if "instances" in payload:
        rows = payload["instances"]
        if not isinstance(rows, list):
            raise RequestError(400, f"field 'instances': expected a list, got {_kind(rows)}")
        n = len(rows)
        _check_rows(n, max_rows)
        # Field by field rather than row by row: the loops run in C (this is on the event loop).
        if not all(isinstance(row, dict) for row in rows):
            i, row = next((i, r) for i, r in enumerate(rows) if not isinstance(r, dict))
            raise RequestError(400, f"instances[{i}]: expected an object, got {_kind(row)}")
        present = set().union(*rows)
        if not present <= accepted:
            i, key = next((i, k) for i, r in enumerate(rows) for k in r if k not in accepted)
            raise RequestError(
                400, f"instances[{i}]: unknown field {key!r}; expected {sorted(accepted)}"
            )
        if keep_rows and not ids:
            return Rows(rows, present), n, ids  # type: ignore[return-value]
        return {key: [row.get(key) for row in rows] for key in present}, n, ids
    columns = payload["inputs"]
    if not isinstance(columns, dict):
        raise RequestError(400, f"field 'inputs': expected an object, got {_kind(columns)}")
    for key, values in columns.items():
        if key not in accepted:
            raise RequestError(400, f"inputs: unknown field {key!r}; expected {sorted(accepted)}")
        if not isinstance(values, list):
            raise RequestError(400, f"inputs.{key}: expected a list, got {_kind(values)}")
    sizes = {k: len(v) for k, v in columns.items()}
    if len(set(sizes.values())) > 1:
        longest = max(sizes, key=sizes.__getitem__)
        shortest = min(sizes, key=sizes.__getitem__)
        raise RequestError(
            400,
            f"inputs: ragged columns: {shortest!r} has {sizes[shortest]} values, "
            f"{longest!r} has {sizes[longest]}",
        )
    n = next(iter(sizes.values()), 0)
    _check_rows(n, max_rows)
    return columns, n, ids


class Rows:
    """A rows-form request's validated rows and the fields they hold: columns are built for
    a whole batch at once (one pass a field over all its requests' rows)."""

    __slots__ = ("fields", "rows")

    def __init__(self, rows: list[dict[str, Any]], fields: set[str]) -> None:
        self.rows = rows
        self.fields = fields

    def columns(self) -> dict[str, list[Any]]:
        return rows_to_columns(self.rows, self.fields)


def rows_to_columns(rows: list[dict[str, Any]], fields: Collection[str]) -> dict[str, list[Any]]:
    """Rows (each holding some of ``fields``) -> field -> every row's value (None where a row
    lacks the field). Where every row holds every field (a row's keys are among ``fields``,
    so equal counts say so), the transpose runs in C: ``itemgetter`` a row, ``zip`` the
    tuples."""
    keys = list(fields)
    if rows and len(keys) > 1 and sum(map(len, rows)) == len(rows) * len(keys):
        values = zip(*map(itemgetter(*keys), rows), strict=True)
        return dict(zip(keys, map(list, values), strict=True))
    return {key: [row.get(key) for row in rows] for key in keys}


def _check_rows(n: int, max_rows: int) -> None:
    if n == 0:
        raise RequestError(400, "no rows to predict")
    if n > max_rows:
        raise RequestError(413, f"{n} rows exceed the limit of {max_rows} per request")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def ids_records(served: Served, columns: dict[str, list[Any]], n: int) -> EncodedRecords:
    """Prepared ids (sparse) and transformed floats (dense), validated per field."""
    dense = np.zeros((n, len(served.dense)), dtype=np.float32)
    for j, name in enumerate(served.dense):
        if name in columns:
            dense[:, j] = _numbers(name, columns[name])
    sparse: dict[str, np.ndarray | list[np.ndarray]] = {}
    lengths: dict[str, np.ndarray] = {}
    keyed = set(served.model.fingerprint_fields)
    for f in served.sparse:
        # A fingerprint-keyed field's "id" is the raw value's 64-bit fingerprint.
        name, card = f["name"], (None if f["name"] in keyed else f["cardinality"])
        values = columns.get(name)
        if f["multi_hot"]:
            bags = [[] if v is None else v for v in (values or [None] * n)]
            if any(not isinstance(b, list) for b in bags):
                raise RequestError(400, f"field {name!r}: expected lists of ids")
            lengths[name] = np.fromiter(map(len, bags), dtype=np.int64, count=n)
            flat = _ids(name, [x for b in bags for x in b], card)
            sparse[name] = np.split(flat, np.cumsum(lengths[name])[:-1])
        else:
            sparse[name] = np.zeros(n, np.int64) if values is None else _ids(name, values, card)
    return EncodedRecords(dense, sparse, lengths)


def _ids(name: str, values: list[Any], cardinality: int | None) -> np.ndarray:
    kinds = set(map(type, values))
    if not kinds <= {int, type(None)}:
        bad = next(v for v in values if type(v) not in (int, type(None)))
        raise RequestError(400, f"field {name!r}: ids must be integers, got {_kind(bad)}")
    if type(None) in kinds:
        values = [0 if v is None else v for v in values]
    try:
        ids = np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise RequestError(400, f"field {name!r}: id out of range") from None
    if cardinality is not None and len(ids) and (ids.min() < 0 or ids.max() >= cardinality):
        raise RequestError(400, f"field {name!r}: ids must lie in [0, {cardinality})")
    return ids


def _numbers(name: str, values: list[Any]) -> np.ndarray:
    kinds = set(map(type, values))
    if not kinds <= {int, float, type(None)}:
        bad = next(v for v in values if type(v) not in (int, float, type(None)))
        raise RequestError(400, f"field {name!r}: expected numbers, got {_kind(bad)}")
    try:
        return np.asarray([0.0 if v is None else v for v in values], dtype=np.float32)
    except OverflowError:
        raise RequestError(400, f"field {name!r}: number out of range") from None
