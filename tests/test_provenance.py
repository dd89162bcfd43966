"""Specification of the provenance every results file records (mp_model.recipe.provenance): the commit, and what is
known of the tree's state, also on a copy of the tree outside its checkout."""

from __future__ import annotations

import re

import pytest

from mp_model.recipe.provenance import SOURCE_COMMIT_VARIABLE, provenance


def test_in_the_checkout_the_commit_is_heads_and_dirtiness_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOURCE_COMMIT_VARIABLE, raising=False)
    record = provenance("cpu", command="x")
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", record["git_commit"])
    assert isinstance(record["git_dirty"], bool) or record["git_commit"] == "unknown"


def test_a_declared_source_commit_wins_and_dirtiness_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent GPU machine gets a copy of the tree whose .git may be older than the files: the runner declares it."""
    monkeypatch.setenv(SOURCE_COMMIT_VARIABLE, "0123abcd" * 5)
    record = provenance("cpu", command="x")
    assert record["git_commit"] == "0123abcd" * 5
    assert record["git_dirty"] is None
