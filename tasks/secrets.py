"""Secrets kept out of every ``repr``, log line, page and error message: a Redis URL's password (in its user
part, or a ``password`` query parameter), and values such as the API key."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

MASK = "***"

#: A ``;`` that starts another URL (``sentinel://a;sentinel://b``); one inside a password does not.
_URLS = re.compile(r";(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
_USER = re.compile(r"^([a-z][a-z0-9+.-]*://)(.*)@", re.IGNORECASE | re.DOTALL)


def masked_url(url: str) -> str:
    """``url`` (or several, ``;``-separated, as sentinels are given) with every password replaced by ``***``:
    what a message may show of a URL."""
    return ";".join(_masked(part) for part in _URLS.split(url))


def with_password(url: str, password: str) -> str:
    """``url`` (or several, ``;``-separated) with ``password``, percent-encoded, in each URL that has no user
    part: what writing it there would do, without the encoding left to whoever writes it."""
    return ";".join(_with_password(part, quote(password, safe="")) for part in _URLS.split(url))


def _with_password(url: str, password: str) -> str:
    user = _USER.match(url)
    if user is None:
        return url.replace("://", f"://:{password}@", 1) if "://" in url else url
    if ":" in user.group(2):
        return url  # a password of its own
    return f"{user.group(1)}{user.group(2)}:{password}@{url[user.end():]}"  # a user name alone: its password


def masked(value: str) -> str:
    """A secret as a message may show it: whether it is set, never what it is."""
    return MASK if value else ""


def _masked(url: str) -> str:
    try:
        query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        return MASK  # not a URL that can be read: show none of it
    shown = url
    user = _USER.match(url)  # up to the last '@': a password with an unencoded '/' or '#' is all masked too
    if user:
        name, has_password, _ = user.group(2).partition(":")
        # redis-py reads a lone user part as a username; it may still be a password set by mistake.
        shown = f"{user.group(1)}{f'{name}:{MASK}' if has_password else MASK}@{url[user.end():]}"
    if any("password" in key.lower() for key, _ in query):
        hidden = urlencode([(k, MASK if "password" in k.lower() else v) for k, v in query], safe="*/")
        shown = f"{shown.split('?', 1)[0]}?{hidden}"
    return shown
