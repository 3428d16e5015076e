"""Credential redaction for everything a job records: URIs, free text, configs and log lines.

One policy, applied wherever a value leaves the process (``config.yaml``, MLflow params and tags,
``run_info.json``, ``rejects.jsonl``, log lines, error messages):

* :func:`redact_uri` removes a URI's userinfo (``s3://KEY:SECRET@bucket/x`` -> ``s3://bucket/x``)
  and replaces its query string (where presigned URLs carry ``X-Amz-Signature``, ``Signature``,
  ``token``...) with ``?<redacted>`` and a fragment holding ``=`` (``#access_token=...``) with
  ``#<redacted>``; a fragment without ``=`` (``manifest.csv#12``, a row) stays. A URI with none
  of these is returned unchanged.
* :func:`redact_text` does that to every ``scheme://...`` URI found inside free text, then replaces
  the values of credential environment variables present in the process environment
  (:func:`secret_env_values`) with ``<redacted>``.
* :func:`redact_config` applies :func:`redact_text` to every string of a nested dict/list config,
  and replaces the whole value of a key named like a credential (``password``, ``api_key``...).
* :class:`RedactingFilter` / :func:`install_log_filter` redact log records on the root handlers.

Redaction is idempotent: redacting redacted text changes nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

# Always treated as credentials (names that no suffix below matches: AWS_ACCESS_KEY_ID).
CREDENTIAL_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "OPENAI_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SECRET_NAME_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_KEY")
# A value counts from this length on: shorter ones are flags or placeholders ("1", "true", moto's
# "testing"), no credential, and replacing them everywhere would garble every message.
MIN_SECRET_CHARS = 8

# Config keys whose string value is a credential as a whole (compared lower-case, after the last '.').
SECRET_KEY_NAMES = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "secret_key", "auth_token"}
)

# A URI inside text: scheme://, then anything up to whitespace, a quote or angle bracket. The
# literal "<redacted>" is part of a URI so that already-redacted text matches whole (idempotence).
# A URI also ends where another one starts ("s3://a,s3://b" is two).
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URI_RE = re.compile(rf"\b{_SCHEME}(?:<redacted>|(?!{_SCHEME})[^\s'\"<>`])+")


def environ_snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) that another thread changing it cannot break.

    Iterating ``os.environ`` lists its names first and then looks each one up, so a variable that
    another thread removes in between raises ``KeyError`` (MLflow's URI switching does that in the
    tracking thread while the training thread redacts a message): names gone by the time they are
    read are left out."""
    env = os.environ if environ is None else environ
    snapshot: dict[str, str] = {}
    for name in list(env):
        value = env.get(name)
        if value is not None:
            snapshot[name] = value
    return snapshot


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the credential variables set in ``environ`` (default ``os.environ``): those
    of :data:`CREDENTIAL_ENV_VARS` and of any variable whose name ends with one of
    :data:`SECRET_NAME_SUFFIXES`, of at least :data:`MIN_SECRET_CHARS` characters; longest first
    (so a value containing another goes whole)."""
    values: set[str] = set()
    for name, value in environ_snapshot(environ).items():
        if not value:
            continue
        upper = name.upper()
        if len(value) >= MIN_SECRET_CHARS and (
            upper in CREDENTIAL_ENV_VARS or upper.endswith(SECRET_NAME_SUFFIXES)
        ):
            values.add(value)
    return sorted(values, key=lambda v: (-len(v), v))


def _replace_env_values(text: str) -> str:
    for value in secret_env_values():
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def _redact_one_uri(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text.split("?", 1)[0].split("#", 1)[0]
    netloc, slash, path = rest.partition("/")
    # An unencoded '/' in a password (AWS secrets have them) splits the userinfo at the first '/':
    # "KEY:se/cret@bucket/x". A first segment "user:<not a port>" with an '@' later is that case.
    _user, colon, after = netloc.partition(":")
    head = rest.split("?", 1)[0].split("#", 1)[0]
    if colon and "@" not in netloc and not after.isdigit() and "@" in head:
        netloc, slash, path = rest[head.rindex("@") + 1 :].partition("/")
    # A netloc ends at the first '?' or '#' too ("https://host?sig=x" has no path).
    cut = min((i for i in (netloc.find("?"), netloc.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        netloc, slash, path = netloc[:cut], "", netloc[cut:] + slash + path
    netloc = netloc.rsplit("@", 1)[-1]
    path, hash_, fragment = path.partition("#")
    bare, question, _query = path.partition("?")
    # A fragment without '=' is a locator, not a credential: "manifest.csv#12" names a row.
    if "=" in fragment:
        fragment = REDACTED
    return f"{scheme}://{netloc}{slash}{bare}" + (f"?{REDACTED}" if question else "") + hash_ + fragment


def redact_uri(uri: Any) -> str:
    """``uri`` fit for a log, a rejects file or a tracker: no user/password, the query string
    replaced by ``?<redacted>``, a fragment with ``=`` by ``#<redacted>``, and credential
    environment values replaced. A string without ``://`` loses what follows a ``?`` or ``#``."""
    return _replace_env_values(_redact_one_uri(str(uri)))


def redact_text(message: Any) -> str:
    """``message`` with every ``scheme://`` URI in it passed through :func:`redact_uri`'s rules
    and every credential environment value (:func:`secret_env_values`) replaced by ``<redacted>``.
    Text without URIs or credentials is returned unchanged."""
    text = str(message)
    if "://" in text:
        text = _URI_RE.sub(lambda m: _redact_one_uri(m.group(0)), text)
    return _replace_env_values(text)


def _secret_key(key: Any) -> bool:
    return str(key).rsplit(".", 1)[-1].lower() in SECRET_KEY_NAMES


def redact_config(obj: Any) -> Any:
    """A copy of a nested config (dicts, lists, tuples, scalars) with every string passed through
    :func:`redact_text` and the non-empty string value of a credential-named key
    (:data:`SECRET_KEY_NAMES`) replaced by ``<redacted>``. Mapping keys are redacted as text too;
    non-string scalars are returned as they are; tuples become lists."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            name = redact_text(key) if isinstance(key, str) else key
            if isinstance(value, str) and value and _secret_key(key):
                out[name] = REDACTED
            else:
                out[name] = redact_config(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_config(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments merged in), traceback and stack with
    :func:`redact_text`; never drops a record."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it for the handler to report
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            # Formatted here so the handler's formatter reuses the redacted text (it only formats
            # exc_info when exc_text is empty).
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to ``logger`` (default the root logger) and to each of
    its handlers, once (a second call adds none); returns the filter. Handlers added later are
    not covered: call it after the logging setup (``logging.basicConfig``)."""
    target = logging.getLogger() if logger is None else logger
    existing = next((f for f in target.filters if isinstance(f, RedactingFilter)), None)
    filt = existing or RedactingFilter()
    if existing is None:
        target.addFilter(filt)
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(filt)
    return filt


__all__ = [
    "CREDENTIAL_ENV_VARS",
    "REDACTED",
    "RedactingFilter",
    "install_log_filter",
    "redact_config",
    "redact_text",
    "redact_uri",
    "secret_env_values",
]
