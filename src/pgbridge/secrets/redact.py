"""Keep secret values out of logs and error messages.

Why this exists: pgbridge passes passwords to libpq, Patroni and the CDC pipeline, and the text that
comes back (tracebacks, server errors, command lines, connection strings) can echo them. Everything
that is printed or logged goes through a :class:`Redactor`, which replaces every known secret value
with ``********`` and masks passwords in connection strings even when the value is not known to it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote

from pgbridge.secrets.store import MASK, Secret

if TYPE_CHECKING:
    from pgbridge.secrets.store import SecretStore

__all__ = ["RedactingFilter", "Redactor", "redact_dsn"]

# password=... in a libpq key/value string (also PGPASSWORD=... in an environment dump); the value is
# a single-quoted string with backslash escapes (maybe unterminated) or everything up to white space.
_KV_PASSWORD = re.compile(
    r"""(?<![\w?&])((?:pg)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']\S*)""",
    re.IGNORECASE,
)
# ?password=... / &password=... in a URL query string.
_QUERY_PASSWORD = re.compile(r"([?&](?:pg)?password=)([^&#\s]*)", re.IGNORECASE)
# scheme://user:password@host: the password runs to the last '@' before the path.
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s/@:?#]*):([^\s/?#]*)@", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """Mask the password in a libpq DSN: ``password=...`` key/values and ``user:pass@`` in URLs.

    Works on any text that contains DSNs (log lines, error messages, command lines).
    """
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", dsn)
    text = _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)


class Redactor:
    """Known secret values, and the means to scrub them out of text.

    Empty values are ignored (they cannot be found in text). The URL-encoded form of each value is
    known too, since passwords with special characters appear percent-encoded in URLs.
    """

    def __init__(self, secrets: Iterable[str | Secret] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    @classmethod
    def from_store(cls, store: SecretStore) -> Redactor:
        """A redactor that knows every value in ``store``."""
        return cls(store.get(name) for name in store.names())

    def add(self, *secrets: str | Secret) -> None:
        for secret in secrets:
            value = secret.reveal() if isinstance(secret, Secret) else secret
            if not value:
                continue
            self._values.add(value)
            encoded = quote(value, safe="")
            if encoded != value:
                self._values.add(encoded)
        # Longest first: the regex alternation takes the first alternative that matches, so a secret
        # that contains another secret is replaced as a whole.
        ordered = sorted(self._values, key=lambda v: (-len(v), v))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Redactor({len(self._values)} values)"

    def redact(self, text: str) -> str:
        """Replace each known secret in ``text`` with ``********``, then mask DSN passwords."""
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_dsn(text)

    def redact_dsn(self, dsn: str) -> str:
        """Same as :meth:`redact`; named for call sites that handle connection strings."""
        return self.redact(dsn)


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message, traceback and stack through a Redactor.

    Attach it to handlers (``handler.addFilter(RedactingFilter(redactor))``) so it sees records from
    all loggers. The Redactor may be extended after the filter is attached.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True
