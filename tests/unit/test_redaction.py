"""sama.redaction: URIs, free text, environment credentials, configs and log records."""

from __future__ import annotations

import collections.abc
import json
import logging

import pytest

from sama import config as config_lib
from sama import redaction, storage
from sama.prep import ledger
from sama.redaction import (
    REDACTED,
    environ_snapshot,
    redact_config,
    redact_text,
    redact_uri,
    secret_env_values,
)

SECRET_ENV = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzzSecret",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEFakeSessionToken",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEENVKEYID",
    "HF_TOKEN": "hf_fakeHuggingFaceToken",
    "MY_SERVICE_PASSWORD": "hunter2hunter2",
}


@pytest.fixture
def secret_env(monkeypatch):
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    return SECRET_ENV


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x.mp4", "s3://bucket/x.mp4"),
        ("http://user:pass@host:8080/v1", "http://host:8080/v1"),
        (
            "https://host/obj.mp4?X-Amz-Signature=deadbeefsig&X-Amz-Credential=AKIA",
            "https://host/obj.mp4?<redacted>",
        ),
        ("https://host/obj?Signature=abc&Expires=1", "https://host/obj?<redacted>"),
        ("https://host?token=abc", "https://host?<redacted>"),
        ("https://host/a#access_token=abc", "https://host/a#<redacted>"),
        ("https://host/a?sig=1#access_token=abc", "https://host/a?<redacted>#<redacted>"),
        ("s3://bucket/edits.csv#12", "s3://bucket/edits.csv#12"),  # a manifest row
        # An unencoded '/' in the secret does not leave its tail in the path.
        ("s3://AKIAFAKE:se/cret+x@bucket/k", "s3://bucket/k"),
        # Nothing to redact: unchanged (ports, '@' in object names, plain paths).
        ("s3://bucket/prefix/video@2x.mp4", "s3://bucket/prefix/video@2x.mp4"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("/data/clips/a.mp4", "/data/clips/a.mp4"),
        ("/data/clips/a.mp4?sig=1", "/data/clips/a.mp4"),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_uri(expected) == expected  # idempotent
    assert storage.redact(uri) == expected  # the old entry point is the same function


def test_redact_text_finds_uris_in_messages():
    message = (
        "cannot read s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x (row 3), "
        "nor 'https://host/obj?X-Amz-Signature=deadbeefsig', "
        "nor s3://a:b1secret@c/d,s3://e:f2secret@g/h"
    )
    out = redact_text(message)
    for secret in ("AKIAFAKEKEY", "fakeSecretValue123", "deadbeefsig", "b1secret", "f2secret"):
        assert secret not in out
    assert out == (
        "cannot read s3://bucket/x (row 3), nor 'https://host/obj?<redacted>', nor s3://c/d,s3://g/h"
    )
    assert redact_text(out) == out
    assert redact_text("no uri here, 3 < 4 and a?b") == "no uri here, 3 < 4 and a?b"


def test_env_credentials_are_replaced(secret_env, monkeypatch):
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # under 8 characters: no credential
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto's placeholder, listed name, too short
    monkeypatch.setenv("UNRELATED_VALUE", "notasecretvalue")
    values = secret_env_values()
    assert set(SECRET_ENV.values()) - {SECRET_ENV["AWS_ACCESS_KEY_ID"]} <= set(values)
    assert "abc" not in values and "notasecretvalue" not in values and "testing" not in values
    env = {**secret_env, "AWS_ACCESS_KEY_ID": "AKIAFAKEENVKEYID"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
    text = " ".join(f"{k}={v}" for k, v in env.items()) + " notasecretvalue abc testing"
    out = redact_text(text)
    for value in env.values():
        assert value not in out
    assert out.count(REDACTED) == len(env)
    assert out.endswith("notasecretvalue abc testing")


class _EnvironLosingAVariable(collections.abc.Mapping):
    """An environment from which another thread removes ``gone`` between listing the names and
    reading them, as os.environ behaves while MLflow switches its URI in the tracking thread."""

    def __init__(self, values: dict[str, str], gone: str):
        self._values, self._gone = dict(values), gone

    def __iter__(self):
        names = list(self._values)
        self._values.pop(self._gone)
        return iter(names)

    def __len__(self):
        return len(self._values)

    def __getitem__(self, name):
        return self._values[name]


def test_env_credentials_survive_a_variable_removed_while_they_are_read():
    environ = _EnvironLosingAVariable(
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HF_TOKEN": "hf_fakeTokenValue1"},
        "MLFLOW_TRACKING_URI",
    )
    assert secret_env_values(environ) == ["hf_fakeTokenValue1"]
    environ = _EnvironLosingAVariable({"A": "1", "B": "2"}, "A")
    assert environ_snapshot(environ) == {"B": "2"}


def test_redact_config_keeps_plain_values(secret_env):
    cfg = {
        "output": {"uri": "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/out"},
        "inputs": ["https://host/a?X-Amz-Signature=deadbeefsig", "s3://bucket/plain"],
        "tracking": {"uri": "http://127.0.0.1:5000", "tags": {"note": SECRET_ENV["HF_TOKEN"]}},
        "judge": {"api_key": "sk-literal", "base_url": "http://u:p@judge/v1"},
        "steps": 4,
        "lr": 1e-3,
        "flag": True,
        "none": None,
    }
    out = redact_config(cfg)
    assert out == {
        "output": {"uri": "s3://bucket/out"},
        "inputs": ["https://host/a?<redacted>", "s3://bucket/plain"],
        "tracking": {"uri": "http://127.0.0.1:5000", "tags": {"note": REDACTED}},
        "judge": {"api_key": REDACTED, "base_url": "http://judge/v1"},
        "steps": 4,
        "lr": 1e-3,
        "flag": True,
        "none": None,
    }
    assert cfg["output"]["uri"].startswith("s3://AKIA")  # a copy: the input is untouched


def test_config_dumps_is_redacted(secret_env):
    from sama.tracking import TrackingConfig

    cfg = TrackingConfig(
        uri="http://admin:pw123456@mlflow:5000",
        tags={"src": "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x", "plain": "s3://bucket/y"},
    )
    text = config_lib.dumps(cfg)
    assert "AKIAFAKEKEY" not in text and "fakeSecretValue123" not in text and "pw123456" not in text
    assert "http://mlflow:5000" in text and "s3://bucket/x" in text and "s3://bucket/y" in text


def test_log_filter_redacts_messages_args_and_tracebacks(secret_env, caplog):
    logger = logging.getLogger("sama.test_redaction")
    handler_filter = redaction.RedactingFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="sama.test_redaction"):
            logger.info(
                "reading %s with key %s", "s3://K:fakeSecretValue123@b/x", SECRET_ENV["AWS_ACCESS_KEY_ID"]
            )
            try:
                raise ValueError("bad https://h/o?X-Amz-Signature=deadbeefsig")
            except ValueError:
                logger.exception("failed")
        text = caplog.text
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert "reading s3://b/x with key <redacted>" in text
    assert "ValueError: bad https://h/o?<redacted>" in text
    for secret in ("fakeSecretValue123", SECRET_ENV["AWS_ACCESS_KEY_ID"], "deadbeefsig"):
        assert secret not in text


def test_install_log_filter_is_idempotent():
    logger = logging.getLogger("sama.test_redaction.install")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        first = redaction.install_log_filter(logger)
        second = redaction.install_log_filter(logger)
        assert first is second
        assert handler.filters == [first] and logger.filters == [first]
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(first)


def test_rejects_and_summary_are_redacted(tmp_path, secret_env):
    bad = "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x.mp4"
    result = ledger.UnitResult(
        unit_id="u0",
        inputs=[bad],
        rejects=[ledger.Reject(bad, "bad_location", f"{bad}: not allowed ({SECRET_ENV['HF_TOKEN']})")],
    )
    failure = ledger.UnitFailure("u1", "OSError: https://h/o?X-Amz-Signature=deadbeefsig")
    summary = ledger.summarize([result], [result], 1.0, [failure])
    ledger.write_summary(str(tmp_path), [result], summary)
    ledger.write_marker(str(tmp_path), result)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in ("AKIAFAKEKEY", "fakeSecretValue123", "deadbeefsig", SECRET_ENV["HF_TOKEN"]):
        assert secret.encode() not in written
    reject = json.loads((tmp_path / ledger.REJECTS_FILE).read_text().splitlines()[0])
    assert reject == {"input": "s3://bucket/x.mp4", "reason": "bad_location", "detail": reject["detail"]}
    assert reject["detail"] == "s3://bucket/x.mp4: not allowed (<redacted>)"


def test_resume_compares_with_the_redacted_config_yaml(tmp_path):
    """A checkpoint's config.yaml is saved redacted: a run whose data URI carries credentials
    resumes without reading as changed, and a real change is still found."""
    from sama.train import checkpoint as ckpt
    from sama.train.launch import ConfigChanged, check_config_change
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig, resolve_train_config

    sources = 'data.sources=[{name="p", uri="s3://AKIAFAKEKEY:fakeSecretValue123@bucket/p", media="video"}]'
    cfg = config_lib.load(TrainConfig, recipe_path("debug"), [sources])
    saved = config_lib.dumps(resolve_train_config(cfg, strict=False))
    assert "fakeSecretValue123" not in saved and "s3://bucket/p" in saved
    (tmp_path / ckpt.CONFIG_FILE).write_text(saved)
    assert check_config_change(cfg, str(tmp_path), allow=False) == []
    changed = config_lib.apply_override(cfg, "optim.lr=0.5")
    with pytest.raises(ConfigChanged):
        check_config_change(changed, str(tmp_path), allow=False)
