"""A test that cannot run its subject skips on a developer's machine and fails under CI."""

import pytest

from tests.brokers import need


def test_need_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the subject is missing"):
        need(False, "the subject is missing")


def test_need_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI a test that cannot run fails"):
        need(False, "the subject is missing")
    need(True, "present: nothing happens")
