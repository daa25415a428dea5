"""Request bodies sent with ``Content-Encoding``: gzip and deflate are decoded here, bounded by the
body limit (a small compressed body cannot expand past ``max_body_bytes``); a body that does not
decode is InvalidRequest (400), an encoding the service does not take is UnsupportedMediaType (415).

The service turns aiohttp's own decoding off (``auto_decompress=False`` in app.py) because aiohttp
refuses br and zstd inside its HTTP parser, before any handler, with a plain-text answer.
"""
from __future__ import annotations

import zlib

from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

SUPPORTED = ("gzip", "x-gzip", "deflate", "identity")
_CHUNK = 1 << 20


def _inflate(data: bytes, wbits: int, limit: int, name: str) -> bytes:
    d = zlib.decompressobj(wbits)
    out = bytearray()
    try:
        buf = data
        while buf:
            out += d.decompress(buf, _CHUNK)
            if len(out) > limit:
                raise PayloadTooLarge(f"request body larger than the limit of {limit} bytes once decoded ({name})")
            buf = d.unconsumed_tail
        out += d.flush()
    except zlib.error as exc:
        raise InvalidRequest(f"request body does not decode as {name}: {exc}") from None
    if not d.eof:
        raise InvalidRequest(f"request body does not decode as {name}: the stream is cut short")
    if d.unused_data:
        raise InvalidRequest(f"request body does not decode as {name}: {len(d.unused_data)} bytes after its end")
    if len(out) > limit:
        raise PayloadTooLarge(f"request body larger than the limit of {limit} bytes once decoded ({name})")
    return bytes(out)


def decode_body(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``data`` with its content codings undone (the last one applied is undone first)."""
    if not content_encoding:
        return data
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    unknown = [c for c in codings if c not in SUPPORTED]
    if unknown:
        raise UnsupportedMediaType(f"Content-Encoding {', '.join(unknown)} is not supported "
                                   f"(send the body as is, or with gzip or deflate)")
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            data = _inflate(data, 16 + zlib.MAX_WBITS, limit, "gzip")
        elif coding == "deflate":
            # RFC 9110's deflate is the zlib format; some clients send the raw stream: accept both
            raw = data[:1] and (data[0] & 0x0F) != 8
            data = _inflate(data, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS, limit, "deflate")
    return data
