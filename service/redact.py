"""Keep Redis passwords out of everything printed: messages, logs, /readyz, start-up errors."""

from __future__ import annotations

import re
from urllib.parse import unquote


def _split_userinfo(url: str) -> tuple[str, str, str, str]:
    """(scheme, userinfo, rest, query): userinfo is everything before the LAST "@" after the
    scheme, so a password holding "@" or "/" (not percent-encoded) is still all userinfo.
    Splitting this loosely over-redacts odd URLs rather than leak part of a password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, after = rest.rpartition("@")
    if not at:
        userinfo, after = "", rest
    path, _, query = after.partition("?")
    return scheme, userinfo if at else "", path, query


def _passwords(url: str) -> list[str]:
    """The secrets a Redis URL may hold, as written and percent-decoded."""
    _, userinfo, _, query = _split_userinfo(url)
    found = []
    if ":" in userinfo:  # a lone userinfo ("redis://app@host") is a user name
        found.append(userinfo.partition(":")[2])
    for field in query.split("&"):
        name, _, value = field.partition("=")
        if unquote(name).lower() == "password":
            found.append(value)
    found += [unquote(value) for value in found]
    return [value for value in found if value]


def scrub_secrets(text: str, url: str) -> str:
    """Replace every password of `url` found in `text` (e.g. an exception message) by ***.

    Pieces of a password cut at URL delimiters go too: a parser that misreads an unencoded
    "/" or ":" in a password may quote such a piece as a host, port or path ("pa55" of
    "pa55/word"). Pieces under 3 characters are left, as they would blank out ordinary words.
    """
    secrets = set(_passwords(url))
    for secret in list(secrets):
        secrets.update(piece for piece in re.split(r"[/?#@:]", secret) if len(piece) >= 3)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """A Redis URL fit to print: the password of the userinfo (`user:pass@`) and the
    `password=` query parameter redis-py also accepts become ***."""
    scheme, userinfo, path, query = _split_userinfo(url)
    if userinfo:
        username, colon, _ = userinfo.partition(":")
        userinfo = f"{username}:***@" if username and colon else f"{username or '***'}@"
    fields = []
    for field in query.split("&") if query else []:
        name, _, value = field.partition("=")
        fields.append(f"{name}=***" if unquote(name).lower() == "password" else field)
    redacted = f"{scheme}://{userinfo}{path}" if scheme else f"{userinfo}{path}"
    return f"{redacted}?{'&'.join(fields)}" if query else redacted
