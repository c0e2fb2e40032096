"""The one-pass multipart splitter agrees with python-multipart's streaming parser and refuses bad bodies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from python_multipart.multipart import MultipartParser

from api.inference.uploads import _PLAIN_DISPOSITION, MAX_FIELDS, _disposition, boundary_of, parse_form
from services.errors import InvalidRequest, RequestTooLarge

BOUNDARY = "b0undary-x"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _body(
    parts: list[tuple[str, str | None, bytes]], *, preamble: bytes = b"", padding: bytes = b""
) -> bytes:
    out = [preamble + (b"\r\n" if preamble else b"")]
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out.append(f"--{BOUNDARY}".encode() + padding + b"\r\n")
        out.append(f"Content-Disposition: {disposition}\r\n".encode())
        if filename is not None:
            out.append(b"Content-Type: image/jpeg\r\n")
        out.append(b"\r\n" + content + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\nepilogue".encode())
    return b"".join(out)


def _reference(body: bytes) -> list[tuple[str, str | None, bytes]]:
    """What python-multipart's own parser finds: (name, filename, content) per part."""
    parts: list[tuple[str, str | None, bytes]] = []
    state: dict[str, bytes | list[bytes]] = {}

    def on_part_begin() -> None:
        state.update(headers=[], data=[], field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        state["headers"].append((state["field"], state["value"]))  # type: ignore[union-attr]
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])  # type: ignore[union-attr]

    def on_part_end() -> None:
        from python_multipart.multipart import parse_options_header

        (value,) = [v for k, v in state["headers"] if k.lower() == b"content-disposition"]  # type: ignore[union-attr]
        _, options = parse_options_header(value)
        filename = options[b"filename"].decode() if b"filename" in options else None
        parts.append((options[b"name"].decode(), filename, b"".join(state["data"])))  # type: ignore[arg-type]

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(BOUNDARY.encode(), callbacks)  # type: ignore[arg-type]
    parser.write(body)
    parser.finalize()
    return parts


names = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)
contents = st.binary(max_size=200).filter(lambda b: BOUNDARY.encode() not in b)
part = st.tuples(names, st.one_of(st.none(), names.map(lambda n: n + ".jpg")), contents)


@settings(max_examples=300, deadline=None)
@given(st.lists(part, min_size=1, max_size=6))
def test_parts_match_python_multipart(parts: list[tuple[str, str | None, bytes]]) -> None:
    # Text fields must be UTF-8 here; python-multipart leaves that to its caller.
    parts = [(n, f, c if f is not None else c.decode("latin-1").encode()) for n, f, c in parts]
    body = _body(parts)

    form = parse_form(body, CONTENT_TYPE, max_files=100)

    reference = _reference(body)
    assert form.files == [(n, f, c) for n, f, c in reference if f is not None]
    expected_fields: dict[str, str] = {}
    for name, filename, content in reference:
        if filename is None:
            expected_fields[name] = content.decode()
    assert form.fields == expected_fields


def test_binary_content_with_crlf_and_dashes_survives() -> None:
    data = b"\r\n--\r\n--b0undary\xff\x00\r\n"  # looks like, but is not, a delimiter
    body = _body([("top_k", None, b"3"), ("files", "a.jpg", data)], preamble=b"a preamble", padding=b" \t")

    form = parse_form(body, CONTENT_TYPE, max_files=10)

    assert form.fields == {"top_k": "3"}
    assert form.files == [("files", "a.jpg", data)]


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("application/json", "multipart/form-data"),
        ("multipart/form-data", "no valid boundary"),
        (None, "multipart/form-data"),
    ],
)
def test_other_bodies_are_refused(content_type: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        boundary_of(content_type)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no delimiter at all", "no part"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=a\r\n\r\nx".encode(), "closing boundary"),
        (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=a\r\nx".encode(), "end to its headers"),
        (f"--{BOUNDARY}junk\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "malformed"),
        (
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
            "Content-Disposition",
        ),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\r\n--{BOUNDARY}--'.encode(
                "latin-1"
            ),
            "UTF-8",
        ),
    ],
)
def test_malformed_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_form(body, CONTENT_TYPE, max_files=10)


def test_too_many_files_or_fields_are_refused() -> None:
    files = _body([("files", f"{i}.jpg", b"x") for i in range(3)])
    with pytest.raises(RequestTooLarge, match="more than 2 files"):
        parse_form(files, CONTENT_TYPE, max_files=2)
    fields = _body([(f"f{i}", None, b"x") for i in range(MAX_FIELDS + 1)])
    with pytest.raises(InvalidRequest, match="text fields"):
        parse_form(fields, CONTENT_TYPE, max_files=2)


def _general_disposition(value: bytes) -> tuple[str, str | None] | None:
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(value)
    if kind != b"form-data" or b"name" not in options:
        return None
    filename = options.get(b"filename")
    return options[b"name"].decode(), None if filename is None else filename.decode()


header_text = st.text(alphabet='abc_. ;="\\:\r\né-', max_size=12)


@settings(max_examples=500, deadline=None)
@given(st.one_of(header_text, names), st.one_of(st.none(), header_text, names))
def test_the_plain_header_reading_agrees_with_the_general_parser(name: str, filename: str | None) -> None:
    value = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    headers = b"Content-Disposition: " + value.encode()
    if b"\r" in headers or b"\n" in headers:
        return  # not a header line

    try:
        ours: tuple[str, str | None] | None = _disposition(headers)
    except InvalidRequest:
        ours = None

    assert ours == _general_disposition(value.encode())


def test_headers_written_otherwise_are_read_by_the_general_parser() -> None:
    assert _PLAIN_DISPOSITION.fullmatch(b'form-data; name="files"; filename="a.jpg"') is not None
    # Escapes, other spacing and other case are not the plain form, and still read right.
    assert _disposition(b'Content-Disposition: form-data; name="a\\"b"') == ('a"b', None)
    assert _disposition(b"Content-Disposition: Form-Data;name=x; filename=y.png") == ("x", "y.png")
    assert boundary_of('multipart/form-data; boundary="quoted b"') == b"quoted b"
    assert boundary_of(CONTENT_TYPE) == BOUNDARY.encode()
