"""Secrets kept out of every ``repr``, log line, page and error message: a Redis URL's password (in its user
part, or a ``password`` query parameter), and values such as the API key."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

MASK = "***"

_USER = re.compile(r"^([a-z][a-z0-9+.-]*://)(.*)@", re.IGNORECASE | re.DOTALL)


def masked_url(url: str) -> str:
    """``url`` (or several, ``;``-separated, as sentinels are given) with every password replaced by ``***``:
    what a message may show of a URL."""
    return ";".join(_masked(part) for part in url.split(";"))


def with_password(url: str, password: str) -> str:
    """``url`` (or several, ``;``-separated) with ``password``, percent-encoded, in each URL that has no user
    part: what writing it there would do, without the encoding left to whoever writes it."""
    return ";".join(part if not part or _USER.match(part) or "://" not in part
                    else part.replace("://", f"://:{quote(password, safe='')}@", 1) for part in url.split(";"))


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
