"""`duration_fields` (a Duration's fields for a message initialiser) gives what protobuf's own `FromNanoseconds`
gives, negative and sub-second values included (Duration wants seconds and nanos of one sign)."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from quantrouter.capacity import duration_fields, duration_pb


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 0.123456789, 1.5, 2.9999999999, 12345.678, -1e-9, -0.25, -3.75])
def test_duration_fields_match_protobufs_own_conversion(seconds: float) -> None:
    expected = duration_pb2.Duration()
    expected.FromNanoseconds(int(seconds * 1e9))
    assert duration_pb2.Duration(**duration_fields(seconds)) == expected
    assert duration_pb(seconds) == expected
