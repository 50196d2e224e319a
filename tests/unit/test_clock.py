"""The UTC timestamps ftctl writes: one builder each for the client's and the server's format."""

from __future__ import annotations

import re

from ftctl.clock import utc_iso, utc_iso_ms
from ftctl.deploy.server.shared import now_iso


def test_the_clients_timestamps_end_in_z():
    assert utc_iso(0) == "1970-01-01T00:00:00Z"
    assert utc_iso(86400 + 3661.25) == "1970-01-02T01:01:01Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_iso())


def test_the_prediction_logs_timestamps_carry_milliseconds():
    assert utc_iso_ms(1.5) == "1970-01-01T00:00:01.500Z"
    assert utc_iso_ms(59.0071) == "1970-01-01T00:00:59.007Z"


def test_the_server_programs_timestamps_carry_the_offset():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", now_iso())
