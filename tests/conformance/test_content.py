"""The importable content-store suite (``pyctr.daemon.content.testsuite``) against pyctrd's store."""

from __future__ import annotations

import asyncio

import pytest

from pyctr.daemon.content import testsuite


@pytest.mark.parametrize("case", [c for _, c in testsuite.CASES], ids=[n for n, _ in testsuite.CASES])
def test_content_store(case: testsuite.Case) -> None:
    asyncio.run(case(testsuite.local_store))
