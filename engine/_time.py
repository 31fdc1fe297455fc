"""The one place the engine reads the wall clock.

freezegun's fake ``time.time()`` returns the *real* time when any of the five
frames nearest the call belongs to an ignored module (``threading`` among
them), so a read made close to a thread's entry point escapes the freeze.
``now_ms`` therefore reaches ``time.time()`` through a fixed chain of frames
of this module: the five frames freezegun inspects are always ours, and a
frozen test controls every clock read the engine makes, in every thread.
tests/shell/test_frozen_clock.py keeps this honest.
"""

from __future__ import annotations

import time

__all__ = [
    "now_ms",
]


def _read() -> float:
    return time.time()


def _hop3() -> float:
    return _read()


def _hop2() -> float:
    return _hop3()


def _hop1() -> float:
    return _hop2()


def now_ms() -> int:
    """Unix time in integer milliseconds, as every engine decision sees it."""
    return int(_hop1() * 1000)
