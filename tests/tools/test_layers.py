"""The layers of engine/ hold (tests/support/layers.py; ``make lint`` runs the same check), and the check
catches each kind of breach it exists for."""

from __future__ import annotations

from pathlib import Path

from tests.support.layers import check

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_points_down_and_no_cycle() -> None:
    assert [str(b) for b in check(ROOT)] == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"engine/__init__.py": "", "events/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_an_import_that_points_up_is_a_breach_also_inside_a_function(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"engine/log/__init__.py": "", "engine/shell/__init__.py": "",
                            "engine/shell/shard.py": "", "engine/log/replay.py": (
                                "def f():\n    from engine.shell import shard\n")})
    assert [(b.module, b.imported, b.rule) for b in check(root)] == [
        ("engine.log.replay", "engine.shell.shard", "points up (layer engine.shell is above engine.log)")]


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"engine/core/__init__.py": "", "engine/shell/__init__.py": "",
                            "engine/shell/shard.py": "", "engine/core/rules.py": (
                                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from engine.shell import shard\n")})
    assert check(root) == []


def test_the_core_imports_only_events_and_the_standard_library(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"engine/core/__init__.py": "", "engine/core/rules.py": (
        "import json\nimport orjson\nfrom events import Tier\n")})
    assert [(b.imported, b.rule) for b in check(root)] == [
        ("orjson", "engine.core imports only events and the standard library")]


def test_events_import_nothing_from_engine(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"engine/core/__init__.py": "", "events/x.py": "from engine.core import y\n",
                            "engine/core/y.py": ""})
    assert any(b.module == "events.x" and b.imported == "engine.core.y" for b in check(root))


def test_a_cycle_is_a_breach_even_within_a_layer(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"engine/tools/__init__.py": "",
                            "engine/tools/a.py": "def f():\n    from engine.tools import b\n",
                            "engine/tools/b.py": "from engine.tools import a\n"})
    assert [b.rule for b in check(root)] == ["an import cycle"]
