"""Log lines: one per record whatever a client puts in the values they carry."""

from __future__ import annotations

import json
import logging

from sidecar.observability import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "sidecar.test", "levelno": logging.WARNING, "levelname": "WARNING",
                                 "msg": "reply dead-lettered"})  # fmt: skip
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_text_line_cannot_be_split_by_a_value_from_a_client() -> None:
    forged = "c1\n2026-11-29 08:00:00 ERROR sidecar.auth: admin token accepted"
    line = TextFormatter().format(record(conversation_id=forged, sequence=3, note="two words"))
    assert "\n" not in line
    assert 'conversation_id="c1\\n2026-11-29' in line and "sequence=3" in line and 'note="two words"' in line


def test_a_json_line_survives_a_value_that_is_not_utf8() -> None:
    line = JsonFormatter().format(record(url="http://r/\udcff", ok="é"))
    parsed = json.loads(line)
    assert parsed["url"] == "http://r/\udcff" and parsed["ok"] == "é" and "\n" not in line
