"""A `multipart/form-data` body split into its text fields and files in one pass over the bytes.

`POST /predict` receives many small requests, each a few form fields and one or more images.
starlette's form parser is made for large streamed uploads: every file goes through a
temporary spooled file and dozens of Python callbacks, and FastAPI then revalidates every
field against the route's signature. Here the body is already in memory (the body-size limit
bounds it), so the parts are found with `bytes.find` on the delimiter (RFC 2046 section 5.1.1:
a boundary never occurs inside a part) and each file is one slice of the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.multipart import parse_options_header

from services.errors import InvalidRequest, RequestTooLarge

# Per part: the header block before its content is at most this long (a Content-Disposition
# with a long file name fits many times over).
MAX_PART_HEADER_BYTES = 16 * 1024
# Text fields a request may carry; /predict takes about ten, so more is not a real client.
MAX_FIELDS = 64
# The headers as HTTP clients write them (requests, httpx, curl, browsers), read without the
# general parser, which costs more than the rest of the body's split; anything else (other
# spacing or case, escapes, RFC 2231 parameters) goes through `parse_options_header`.
_PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\\r\n]*)"(?:; filename="([^"\\\r\n]*)")?')
_PLAIN_CONTENT_TYPE = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})")


@dataclass
class Form:
    """The text fields (the last value of a repeated name wins) and the files, in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # (field name, filename, bytes)


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data content type; InvalidRequest for any other body."""
    plain = _PLAIN_CONTENT_TYPE.fullmatch(content_type or "")
    if plain is not None:
        return plain.group(1).encode()
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise InvalidRequest(
            "send the images as multipart/form-data (a 'files' part per image, plus text fields)"
        )
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
        raise InvalidRequest("the multipart/form-data content type has no valid boundary")
    return boundary


def _disposition(headers: bytes) -> tuple[str, str | None]:
    """The `name` and `filename` of a part's Content-Disposition header."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        plain = _PLAIN_DISPOSITION.fullmatch(value.strip())
        if plain is not None:
            return _decoded(plain.group(1)), None if plain.group(2) is None else _decoded(plain.group(2))
        kind, options = parse_options_header(value.strip())
        if kind != b"form-data" or b"name" not in options:
            break
        filename = options.get(b"filename")
        return _decoded(options[b"name"]), None if filename is None else _decoded(filename)
    raise InvalidRequest("every multipart part needs 'Content-Disposition: form-data; name=...'")


def _decoded(text: bytes) -> str:
    try:
        return text.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("a multipart part's name or filename is not UTF-8") from None


def _next_part(body: bytes, delimiter: bytes, position: int) -> tuple[bytes, int, int] | None:
    """The part after the delimiter at `position`: its header block, where its content starts and
    where the next delimiter is; None at the close delimiter."""
    after = position + len(delimiter)
    if body.startswith(b"--", after):
        return None  # the close delimiter; what follows is the epilogue
    line_end = body.find(b"\r\n", after)
    # Only transport padding (spaces and tabs) may follow a delimiter on its line.
    if line_end < 0 or body[after:line_end].strip(b" \t"):
        raise InvalidRequest("the multipart body is malformed after a boundary")
    headers_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADER_BYTES)
    if headers_end < 0:
        raise InvalidRequest("a multipart part has no end to its headers (or headers over 16 KiB)")
    next_position = body.find(delimiter, headers_end + 4)
    if next_position < 0:
        raise InvalidRequest("the multipart body ends before its closing boundary")
    return body[line_end + 2 : headers_end + 2], headers_end + 4, next_position


def _add(form: Form, headers: bytes, content: bytes, max_files: int) -> None:
    name, filename = _disposition(headers)
    if filename is not None:
        if len(form.files) >= max_files:
            raise RequestTooLarge(
                f"more than {max_files} files in one request (MUST_LIMITS__MAX_FILES_PER_REQUEST): "
                "send them in several requests"
            )
        form.files.append((name, filename, content))
        return
    if len(form.fields) >= MAX_FIELDS and name not in form.fields:
        raise InvalidRequest(f"more than {MAX_FIELDS} text fields in one multipart body")
    try:
        form.fields[name] = content.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"the form field {name[:100]!r} is not UTF-8 text") from None


def parse_form(body: bytes, content_type: str | None, *, max_files: int) -> Form:
    """The fields and files of a multipart/form-data body.

    InvalidRequest for a malformed body; RequestTooLarge for more than `max_files` files.
    """
    delimiter = b"\r\n--" + boundary_of(content_type)
    # A delimiter is a CRLF, "--" and the boundary; the body's first one may lack the CRLF:
    # it is then taken to start two bytes before the body.
    position = -2 if body.startswith(delimiter[2:]) else body.find(delimiter)
    if position == -1:
        raise InvalidRequest("the multipart body has no part with the declared boundary")
    form = Form()
    while (part := _next_part(body, delimiter, position)) is not None:
        headers, start, position = part
        _add(form, headers, body[start:position], max_files)
    return form
