"""PostgreSQL URL surgery: the same server as another user or database."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit


def replace_dsn(url: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        userinfo, hostport = "", netloc
    old_user, _, old_password = userinfo.partition(":")
    new_user = quote(user, safe="") if user is not None else old_user
    new_password = quote(password, safe="") if password is not None else old_password
    if new_user:
        userinfo = new_user + (f":{new_password}" if new_password else "")
        netloc = f"{userinfo}@{hostport}"
    path = f"/{quote(database, safe='')}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))
