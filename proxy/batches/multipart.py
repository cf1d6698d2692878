"""multipart/form-data from body bytes and the Content-Type, with the stdlib email parser.

Only what `POST /v1/files` needs: the named fields, and the one file with its name. The
parser is handed the body as a MIME message under the request's own Content-Type (the
HTTP policy: no line-length folding, CRLF kept); parts' bytes are taken undecoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.parser import BytesParser


class MultipartError(ValueError):
    pass


@dataclass(slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """name -> (filename, content)."""


def parse_form(content_type: str, body: bytes) -> Form:
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected a multipart/form-data body")
    if "boundary=" not in content_type.lower():
        raise MultipartError("the multipart Content-Type names no boundary")
    if "\r" in content_type or "\n" in content_type:
        raise MultipartError("invalid Content-Type")
    head = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message: Message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("the body is not multipart (wrong boundary?)")
    if message.defects:
        raise MultipartError(f"malformed multipart body ({type(message.defects[0]).__name__})")
    form = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue  # a part without a form name is not a field
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            form.files[name] = (filename, content)
        else:
            form.fields[name] = content.decode("utf-8", "replace")
    return form
