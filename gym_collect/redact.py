"""Keeping secrets out of every message: header values and the passwords in URLs.

A server's error body may echo the request's headers (proxies and debug pages do), and an aiohttp error may
quote a URL with its userinfo; every message the client builds passes through a `Redactor` first, and every
URL shown to a person goes through `display_url`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote

import orjson
from yarl import URL

REDACTED = "<redacted>"
MIN_SECRET_PART = 6  # shorter parts of a header value are words, not secrets
AUTH_SCHEME = re.compile(r"[A-Za-z][A-Za-z-]{0,15}")  # `Bearer`, `Basic`, `Token`: a word (RFC 9110 §11.1)
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:/*")


class Redactor:
    """Replaces every known secret in a text with `<redacted>`.

    Each secret is matched as given, JSON-escaped, percent-encoded and in base64, and so is each whitespace-separated
    part of at least `MIN_SECRET_PART` characters (the token of `Bearer <token>`), except the leading
    authentication scheme of a value of several parts (`Bearer`, RFC 9110 §11.4: a word, not a credential).
    A value shorter than that (`X-Tenant: 1`) is no credential and cannot be cut out of text without
    garbling it: it is left alone.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in (s for s in secrets if s and len(s) >= MIN_SECRET_PART):
            parts = secret.split()
            if len(parts) > 1 and AUTH_SCHEME.fullmatch(parts[0]):
                parts = parts[1:]
            for part in (secret, *(p for p in parts if len(p) >= MIN_SECRET_PART)):
                forms.update({part, orjson.dumps(part).decode()[1:-1], quote(part, safe=""),
                              base64.b64encode(part.encode()).decode().rstrip("=")})
        ordered = sorted((f for f in forms if f), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._line_pattern = re.compile(b"|".join(re.escape(f.encode()) for f in ordered)) if ordered else None
        self._line_forms = [f.encode() for f in ordered]

    def __bool__(self) -> bool:
        """Whether there is any secret to redact."""
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """`text` with every secret replaced."""
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)

    def line(self, line: bytes) -> bytes:
        """A serialized JSON line (UTF-8) with every secret replaced; still valid JSON, since `<redacted>` needs
        no escaping and each form is matched as JSON writes it. A line without a secret is returned as it is,
        after one substring test per form (cheaper than the pattern on the hot path)."""
        if self._line_pattern is None or not any(form in line for form in self._line_forms):
            return line
        return self._line_pattern.sub(REDACTED.encode(), line)


def userinfo_span(text: str) -> tuple[int, int] | None:
    """Where the userinfo of a URL-like `text` is: from after its scheme (`http://`, also with one slash or
    none) to its last `@`, or None when it has no `@`.

    Lenient on purpose: it also finds the password of a mistyped URL (`http:/u:pw@h`, no scheme, an unescaped
    `/` in the password) that a URL parser reads as a path; in a URL with `@` only in its path it spans more
    than the userinfo, which is safe for hiding."""
    at = text.rfind("@")
    if at <= 0:
        return None
    scheme = URL_SCHEME.match(text)
    start = scheme.end() if scheme is not None and scheme.end() <= at else 0
    return (start, at) if at > start else None


def url_secrets(urls: Iterable[str | None]) -> list[str]:
    """The passwords in the userinfo of `urls`, as given and as the Basic credentials aiohttp sends for them;
    for a URL that does not parse, the whole of what `userinfo_span` finds."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            parsed = None
        if parsed is None or (parsed.user is None and parsed.password is None):
            span = userinfo_span(url)
            if span is not None:
                userinfo = url[span[0]:span[1]]
                found.extend(v for v in (userinfo, userinfo.partition(":")[2]) if v)
            continue
        found.extend(v for v in (parsed.password, parsed.raw_password) if v)
        pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()  # sent as HTTP Basic credentials
        found.append(base64.b64encode(pair).decode())
    return found


def display_url(url: str) -> str:
    """`url` without its userinfo, for messages and logs; a URL that does not parse, or has an `@` its parser
    does not read as userinfo, shows `<redacted>` for what `userinfo_span` finds."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        parsed = None
    if parsed is not None and (parsed.user is not None or parsed.password is not None):
        return str(parsed.with_user(None))
    span = userinfo_span(url)
    return url if span is None else url[:span[0]] + REDACTED + url[span[1]:]
