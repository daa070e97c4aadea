"""Every request is checked here before its handler runs, so that no malformed input reaches
PostgreSQL or turns into a 500 (RFC 9457 problems, rendered by api.errors):

- a form body needs ``Content-Type: application/x-www-form-urlencoded`` (415 otherwise);
- a JSON body needs ``Content-Type: application/json`` (415 otherwise), must be UTF-8 (400),
  JSON (400), nested at most :data:`MAX_DEPTH` deep (400), and match its model *strictly*: no
  ``"1"`` or ``1.0`` for an integer, no unknown field (422, naming the field);
- no text a handler passes on (JSON strings, query and path parameters) may hold the NUL
  character, which PostgreSQL text cannot store (422).

Litestar's own decoding is lenient (``strict=False``); this strict pass runs first, so every
body that reaches a handler also decodes strictly.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException

from api.errors import PgtallyError

MAX_DEPTH = 32
"""How deep a JSON body may nest (objects and arrays). pgtally's own bodies nest at most 3 deep."""


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_ok(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests at most ``limit`` deep, brackets inside strings ignored. Run
    before decoding, so a 10,000-deep body never reaches a recursive parser. The strings are cut
    out and the brackets kept by the regex and bytes machinery (C), so Python walks only the
    brackets, not every byte (a batch of 100 events: 80 us instead of 300)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True                 # too few brackets to nest deeper (most bodies: no scan)
    depth = 0
    for byte in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET):
        if byte in (0x5B, 0x7B):    # [ {
            depth += 1
            if depth > limit:
                return False
        else:                       # ] }
            depth -= 1
    return True


def nul_path(value: Any, path: str = "$") -> str | None:
    """The path of the first string (or key) holding U+0000 in decoded JSON, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if found := (nul_path(key, path) or nul_path(item, f"{path}.{key}")):
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if found := nul_path(item, f"{path}[{i}]"):
                return found
    return None


def invalid(message: str, field: str | None = None) -> PgtallyError:
    return PgtallyError({"sqlstate": "TL422", "message": message, **({"field": field} if field else {})})


def decode_json(body: bytes) -> Any:
    """Untyped JSON within the depth limit; 400 for text that is not UTF-8 JSON or nests too deep."""
    if not json_depth_ok(body):
        raise HTTPException(status_code=400, detail=f"the JSON body nests more than {MAX_DEPTH} levels deep")
    try:
        return msgspec.json.decode(body)
    except UnicodeDecodeError:
        raise HTTPException(status_code=400, detail="the body is not valid UTF-8") from None
    except msgspec.DecodeError as exc:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {exc}") from None


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def check_request(request: Request) -> None:
    """Litestar ``before_request`` hook: the checks of this module, for every route."""
    params = [*request.query_params.values(), *map(str, request.path_params.values())]
    if any("\x00" in value for value in params):
        raise invalid("query and path parameters cannot contain the NUL character (U+0000)")
    field = request.route_handler.parsed_data_field
    if field is None or request.method in ("GET", "HEAD"):
        return
    media_type = getattr(field.kwarg_definition, "media_type", RequestEncodingType.JSON)
    if media_type == RequestEncodingType.URL_ENCODED:
        # HTML forms and the OAuth token endpoints.
        if not request.headers.get("content-type", "").lower().startswith(RequestEncodingType.URL_ENCODED):
            raise HTTPException(status_code=415, detail=f"send the body as {RequestEncodingType.URL_ENCODED}")
        if any("\x00" in str(value) for value in (await request.form()).values()):
            raise invalid("form fields cannot contain the NUL character (U+0000)")
        return
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPException(status_code=415, detail="send the body as JSON with Content-Type: application/json")
    body = await request.body()
    if not json_depth_ok(body):
        raise HTTPException(status_code=400, detail=f"the JSON body nests more than {MAX_DEPTH} levels deep")
    try:
        value = msgspec.json.decode(body or b"null", type=field.annotation, strict=True)
    except UnicodeDecodeError:
        raise HTTPException(status_code=400, detail="the body is not valid UTF-8") from None
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = message.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in message else None
        raise invalid(message.replace("`", ""), where) from None
    except msgspec.DecodeError as exc:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {exc}") from None
    # Decoded JSON holds U+0000 only where the text escapes it (a raw NUL is not JSON).
    if b"\\u0000" in body and (where := nul_path(msgspec.to_builtins(value))):
        raise invalid(f"text cannot contain the NUL character (U+0000): {where}", where)
