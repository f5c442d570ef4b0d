"""redact(): a location with nothing to hide prints as given; secrets never print."""

from __future__ import annotations

import pytest

from services.core.redaction import redact


@pytest.mark.parametrize(
    "location",
    ["lmdb:///srv/cache/teacher-outputs", "redis://127.0.0.1:6379/0", "redis+cluster://h:1,h:2/", "h:50051"],
)
def test_a_location_without_secrets_prints_as_given(location):
    assert redact(location) == location


def test_secrets_are_hidden_wherever_they_are():
    assert redact("redis://:pw@h:1/0?token=t&x=1") == "redis://:***@h:1/0?token=***&x=1"
    assert redact("user:pw@h:50051") == "***@h:50051"
