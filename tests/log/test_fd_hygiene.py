"""A store, a lock or an export that fails half way leaves nothing open or half written behind it."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import SessionStore
from engine.distributed.redis_host import export_streams
from engine.log import segment, writer
from engine.log.fault import AuditLogError
from tests.support.redis_servers import RedisServer


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_torn_tail_that_cannot_be_cut_fails_the_open_and_keeps_no_descriptor(
        make_store: Callable[..., SessionStore], log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(event_log=log_path)
    store.set_session("a", "openai/gpt-4o", "SIMPLE")
    store.close()
    with open(log_path, "ab") as f:
        f.write(b'{"seq":9,"ts":17')  # torn: the next open cuts it

    def refuse(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "injected: the disk refuses the cut")

    monkeypatch.setattr(writer.os, "ftruncate", refuse)
    before = open_fds()
    with pytest.raises(AuditLogError, match="cannot be opened: injected"):
        make_store(event_log=log_path)
    monkeypatch.undo()
    assert open_fds() - before == set()
    reopened = make_store(event_log=log_path)  # and the log still opens once the disk behaves
    assert reopened.get_session("a").model == "openai/gpt-4o"


def test_a_lock_that_fails_for_another_reason_closes_its_descriptor(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "injected: no locks left")

    monkeypatch.setattr(segment.fcntl, "flock", no_locks)
    before = open_fds()
    with pytest.raises(OSError, match="no locks"):
        segment._hold_lock(tmp_path / "audit.lock", tmp_path / "audit.jsonl")
    assert open_fds() - before == set()


def test_an_export_that_fails_leaves_no_staging_file(redis_server: RedisServer, tmp_path: Path) -> None:
    out = tmp_path / "export"
    with pytest.raises(Exception, match="no session-engine namespace"):
        export_streams(redis_server.url, out, namespace="absent")
    assert list(out.iterdir()) == []
