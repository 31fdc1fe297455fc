"""FileLog.append renders a whole batch into one write: one line per record, through the processor chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import structlog

from engine.log.writer import FileLog, drop_forbidden
from events import records as record_names
from tests.conftest import read_log


def touch(sid: str, **extra: Any) -> dict[str, Any]:
    return {"seq": 0, "ts": 1_740_819_600_000, "event": record_names.SESSION_TOUCHED, "session_id": sid,
            "last_used_at": 1,
            "request_count": 2, **extra}


def test_a_large_batch_is_written_as_one_line_per_record_with_consecutive_seqs(log_path: Path) -> None:
    log = FileLog(log_path, fsync="never")
    assert log.append([touch(f"s{i}") for i in range(3)]) == 3
    assert log.append([touch(f"s{i}", prompt="raw text") for i in range(2_000)]) == 2_003
    assert log.append([]) == 2_003
    log.close()
    data = log_path.read_bytes()
    assert data.endswith(b"\n") and b"\n\n" not in data
    records = read_log(log_path)
    assert [r["seq"] for r in records] == list(range(1, 2_004))
    assert all("prompt" not in r for r in records), "content keys are dropped on the hot path too"
    chain = records[-1].pop("chain")  # the batch's seal (docs/audit-log.md)
    assert records[-1] == touch("s1999") | {"seq": 2_003} and len(chain) == 64


def test_custom_processors_render_every_record_of_a_batch(log_path: Path) -> None:
    def stamp(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        return {**event_dict, "host": "h1"}  # a copy: the record itself stays what the schema allows

    def as_text(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
        return orjson.dumps(event_dict).decode()  # a renderer returning str is encoded

    bytes_chain = [drop_forbidden, stamp, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
    log = FileLog(log_path, fsync="never", processors=bytes_chain)
    log.append([touch("a", content="raw"), touch("b")])
    log.close()
    log = FileLog(log_path, fsync="never", processors=[drop_forbidden, stamp, as_text])
    log.append([touch("c")])
    log.close()
    records = read_log(log_path)
    assert [(r["seq"], r["session_id"], r["host"]) for r in records] == [(1, "a", "h1"), (2, "b", "h1"), (3, "c", "h1")]
    assert "content" not in records[0]


def test_the_default_path_is_the_structlog_chain(tmp_path) -> None:
    """The unrolled hot path writes exactly what default_processors() renders, content keys dropped."""
    from engine.log.writer import FileLog, default_processors

    def batch():
        return [{"seq": 0, "ts": 5, "event": "session.touched", "session_id": "s", "last_used_at": 5,
                 "request_count": 2},
                {"seq": 0, "ts": 6, "event": "hash.recorded", "session_id": "s", "prompt": "secret",
                 "recent_hashes": ["h"], "strikes": 1}]

    fast, chain = tmp_path / "fast.jsonl", tmp_path / "chain.jsonl"
    for path, processors in ((fast, None), (chain, default_processors())):
        log = FileLog(path, fsync="never", processors=processors, chain="off")  # no random genesis to differ
        log.append(batch())
        log.close()
    assert fast.read_bytes() == chain.read_bytes()
    assert b"secret" not in fast.read_bytes() and fast.read_bytes().count(b"\n") == 2
