"""Guard: no asyncio.wait_for in Blixard's code.

On Python 3.11, ``asyncio.wait_for`` returns the inner result and drops a
cancellation that arrives while the inner awaitable completes (fixed in
3.12). A dropped cancellation left agent workers running after shutdown and
hung it. ``async with asyncio.timeout(...)`` has no such race.
"""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "blixard"


def test_no_asyncio_wait_for_in_src() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in sorted(SRC.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert offenders == [], f"use `async with asyncio.timeout(...)` instead: {offenders}"
