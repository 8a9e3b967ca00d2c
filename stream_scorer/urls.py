"""Credentials in URLs (``scheme://user:password@host/...``): split off, never printed.

A registry or MLflow URL may carry HTTP basic-auth credentials in its user-info, as many
clients accept. ``split_userinfo`` takes them out, so the URL that is requested, logged and
put in messages never holds them; ``USERINFO`` finds them in any text (the log redaction).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

#: ``scheme://user:password@``: groups ``head`` (``scheme://user:``) and ``password``.
USERINFO: Final = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^\s/?#@:]*:)(?P<password>[^\s/?#]*)@", re.IGNORECASE
)


def split_userinfo(url: str) -> tuple[str, str, str]:
    """``(url without user-info, user, password)``, the user and password percent-decoded.

    ``http://bob:s%40cret@sr:8081/x`` gives ``("http://sr:8081/x", "bob", "s@cret")``; a URL
    without user-info comes back unchanged with two empty strings.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, "", ""
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return bare, urllib.parse.unquote(user), urllib.parse.unquote(password)
