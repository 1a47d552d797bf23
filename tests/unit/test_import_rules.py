"""DESIGN.md's layer rules, checked by scripts/check_imports.py.

The real tree must pass; small fake trees prove the checker catches each kind of breach
(so this test can fail) and lets the allowed arrows through.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKER = REPO / "scripts" / "check_imports.py"


def run_checker(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECKER), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_tree(base: Path, files: dict[str, str]) -> Path:
    """A fake ``blixard`` package under ``base``; every folder gets an ``__init__.py``."""
    root = base / "src" / "blixard"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text('"""Fake blixard."""\n')
    for rel, source in files.items():
        path = root / rel
        for parent in reversed(path.relative_to(root).parents):
            folder = root / parent
            folder.mkdir(exist_ok=True)
            init = folder / "__init__.py"
            if folder != root and not init.exists():
                init.write_text("")
        path.write_text(textwrap.dedent(source))
    return root


def violations(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_real_tree_follows_the_layers() -> None:
    result = run_checker()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_real_tree_passes_from_another_directory(tmp_path: Path) -> None:
    result = run_checker(cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_allowed_arrows_pass(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            "__main__.py": "from blixard.cli import main\n",
            "domain/models.py": "import json\nfrom blixard.domain import errors\n",
            "domain/errors.py": "",
            "store/sqlite.py": (
                "import sqlite3\n"
                "from blixard.domain.errors import X\n"
                "from .protocol import StateStore\n"
                "from .. import domain\n"
            ),
            "store/protocol.py": "",
            "agent/run.py": "from blixard import store, drivers, domain, __version__\n",
            "controllers/vms.py": "import blixard.scheduler.place\nimport blixard\n",
            "functions/gateway.py": "from ..drivers import x\nfrom ..scheduler import y\n",
            "api/app.py": "from blixard.functions.gateway import route\nimport httpx\n",
            "cli/main.py": "from blixard.client import Client\n",
            "daemon/main.py": "from blixard.api import app\nfrom blixard.cli import main\n",
            "sim/cluster.py": "from blixard.agent import a\nfrom blixard.controllers import b\n",
            "images/build.py": "from blixard.domain import models\n",
        },
    )
    result = run_checker(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert violations(result) == [result.stdout.strip()]
    assert result.stdout.startswith("check_imports: OK")


def test_forbidden_imports_are_reported(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            # absolute import, both forms
            "domain/models.py": "import blixard.store.protocol\n",
            "scheduler/place.py": "from blixard.drivers import qemu\n",
            # relative import: store/sqlite.py -> blixard.api
            "store/sqlite.py": "from ..api import app\n",
            # import only for type checking still counts, and so does one inside a function
            "drivers/qemu.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from blixard.store.protocol import StateStore


                def late() -> None:
                    import blixard.agent
            """,
            # an SQLite or etcd library outside blixard/store
            "api/app.py": "import sqlite3\n",
            "controllers/leader.py": "from etcd3aio import client\n",
            # `from blixard import <layer>` names the layer
            "client/http.py": "from blixard import cli\n",
            "cli/main.py": "import importlib\nimportlib.import_module('blixard.store')\n",
            # sim may import everything but api and cli
            "sim/cluster.py": "from blixard.api import app\n",
            "__main__.py": "from blixard.store import main\n",
        },
    )
    (root / "__init__.py").write_text("from . import domain\n")
    result = run_checker(root, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    got = sorted(violations(result))
    expected = sorted(
        [
            "src/blixard/__init__.py:1: blixard.__init__ may not import blixard.domain",
            "src/blixard/__main__.py:1: blixard.__main__ may not import blixard.store",
            "src/blixard/api/app.py:1: api may not import sqlite3",
            "src/blixard/cli/main.py:2: cli may not import blixard.store",
            "src/blixard/client/http.py:1: client may not import blixard.cli",
            "src/blixard/controllers/leader.py:1: controllers may not import etcd3aio",
            "src/blixard/domain/models.py:1: domain may not import blixard.store.protocol",
            "src/blixard/drivers/qemu.py:4: drivers may not import blixard.store.protocol",
            "src/blixard/drivers/qemu.py:8: drivers may not import blixard.agent",
            "src/blixard/scheduler/place.py:1: scheduler may not import blixard.drivers",
            "src/blixard/sim/cluster.py:1: sim may not import blixard.api",
            "src/blixard/store/sqlite.py:1: store may not import blixard.api",
        ]
    )
    assert got == expected


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("util/helpers.py", "", "util/ is not a layer"),
        ("helpers.py", "", "helpers.py is not in a layer"),
        ("store/x.py", "from .... import y\n", "store may not import .... (above blixard)"),
        ("store/x.py", "def broken(:\n", "cannot parse"),
        ("daemon/x.py", "import grpc\n", "daemon may not import grpc"),
        ("sim/x.py", "import sqlite3\n", "sim may not import sqlite3"),
    ],
)
def test_other_breaches_are_reported(tmp_path: Path, rel: str, source: str, expected: str) -> None:
    root = make_tree(tmp_path, {rel: source})
    result = run_checker(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout


def test_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    result = run_checker(tmp_path / "nope")
    assert result.returncode == 2
