"""The ``model`` of a multipart form upload (``/v1/audio/transcriptions``, ``/translations``).

Admission has read the body (within ``max_body_bytes``); it goes to the backend as it came, byte
for byte. Here python-multipart, the parser Starlette uses, finds the form's ``model`` field in
it: the parser is fed the body a slice at a time and stopped once that field has been read. The
OpenAI clients send the fields before the file, so the upload itself is then not even scanned;
nothing of it is copied but the slice under the parser. Where the value lies in the body is kept
as well, so that an alias can be replaced by the served name; a form that names no model gets a
``model`` field of the served name added at its end (``with_model_field``).
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from kernel.errors import GatewayError, bad_request

FORM_TYPE = b"multipart/form-data"
# Bytes handed to the parser at a time: each is one slice (a copy) of the body.
FEED = 64 * 1024
# A model name is short; a longer value is not one, and is not collected.
MAX_MODEL_BYTES = 1024


def _invalid_form(message: str) -> GatewayError:
    return bad_request(message, code="invalid_form")


class _ModelField:
    """Parser callbacks that collect the ``model`` field and where it lies in the body."""

    def __init__(self) -> None:
        self.chunk = b""  # the slice being parsed, and its offset in the body
        self.offset = 0
        self.header_field = b""
        self.header_value = b""
        self.in_model = False
        self.value = b""
        self.span: slice | None = None
        self.contiguous = True
        self.done = False

    def callbacks(self) -> dict[str, object]:
        return {"on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            _, params = parse_options_header(self.header_value)
            self.in_model = params.get(b"name") == b"model" and b"filename" not in params
        self.header_field = self.header_value = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.in_model:
            return
        if len(self.value) + end - start > MAX_MODEL_BYTES:
            raise _invalid_form(f"The form's 'model' field is longer than {MAX_MODEL_BYTES} "
                                "bytes.")
        self.value += data[start:end]
        # Data the parser held back from an earlier slice comes from a buffer of its own.
        if data is not self.chunk:
            self.contiguous = False
        elif self.span is None:
            self.span = slice(self.offset + start, self.offset + end)
        elif self.span.stop == self.offset + start:
            self.span = slice(self.span.start, self.offset + end)
        else:
            self.contiguous = False

    def on_part_end(self) -> None:
        if self.in_model:
            self.done = True
            self.in_model = False


def _boundary(content_type: bytes) -> bytes:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _invalid_form("A multipart/form-data Content-Type needs a boundary.")
    return boundary


def form_model(body: bytes, content_type: bytes) -> tuple[str | None, slice | None]:
    """The form's ``model`` and where its value lies in ``body`` (None: not in one piece);
    None for a form without one or with an empty one (vLLM's form takes either as none)."""
    boundary = _boundary(content_type)
    field = _ModelField()
    try:
        parser = MultipartParser(boundary, field.callbacks())  # type: ignore[arg-type]
        for offset in range(0, len(body), FEED):
            field.offset = offset
            field.chunk = body[offset:offset + FEED]
            parser.write(field.chunk)
            if field.done:
                break
    except ValueError:  # python-multipart's errors (FormParserError) are ValueErrors
        raise _invalid_form("The request body is not a valid multipart form.") from None
    try:
        name = field.value.decode()
    except UnicodeDecodeError:
        raise _invalid_form("The form's 'model' field is not UTF-8 text.") from None
    if not field.done or not name:
        return None, None
    return name, field.span if field.contiguous else None


def with_model_field(body: bytes, content_type: bytes, name: str) -> bytes:
    """``body`` with a ``model`` field of ``name`` as its last part: a form's last value of a
    field is the one its reader takes (Starlette's, so vLLM's), which a field left empty has."""
    close = b"\r\n--" + _boundary(content_type) + b"--"
    end = body.rfind(close)
    if end < 0:
        raise _invalid_form("The multipart form does not end with its closing boundary.")
    field = (close[:-2] + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
             + name.encode())
    return body[:end] + field + body[end:]
