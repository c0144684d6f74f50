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
MIN_SECRET_PART = 6  # shorter parts of a header value ("Bearer") are words, not secrets


class Redactor:
    """Replaces every known secret in a text with `<redacted>`.

    Each secret is matched as given, JSON-escaped and percent-encoded, and so is each whitespace-separated
    part of at least `MIN_SECRET_PART` characters (the token of `Bearer <token>`). A value shorter than that
    (`X-Tenant: 1`) is no credential and cannot be cut out of text without garbling it: it is left alone.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in (s for s in secrets if s and len(s) >= MIN_SECRET_PART):
            for part in (secret, *(p for p in secret.split() if len(p) >= MIN_SECRET_PART)):
                forms.update({part, orjson.dumps(part).decode()[1:-1], quote(part, safe="")})
        ordered = sorted((f for f in forms if f), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        """`text` with every secret replaced."""
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)


def url_secrets(urls: Iterable[str | None]) -> list[str]:
    """The passwords in the userinfo of `urls`, as given and as the Basic credentials aiohttp sends for them."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            continue
        found.extend(v for v in (parsed.password, parsed.raw_password) if v)
        if parsed.user is not None or parsed.password is not None:  # sent as HTTP Basic credentials
            pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()
            found.append(base64.b64encode(pair).decode())
    return found


def display_url(url: str) -> str:
    """`url` without its userinfo, for messages and logs."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return url
    if parsed.user is None and parsed.password is None:
        return url
    return str(parsed.with_user(None))
