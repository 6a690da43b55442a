"""Type URLs for Any: both spellings read, the bare one written, and no needless imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyctr.api import typeurl
from pyctr.api._pb.containerd import events as ev


def test_marshal_writes_the_bare_name_and_unmarshal_reads_both_forms() -> None:
    url, value = typeurl.marshal(ev.TaskExit(container_id="c1", pid=7, exit_status=3))
    assert url == "containerd.events.TaskExit"
    for form in (url, "type.googleapis.com/" + url):
        decoded = typeurl.unmarshal(form, value)
        assert isinstance(decoded, ev.TaskExit)
        assert (decoded.container_id, decoded.pid, decoded.exit_status) == ("c1", 7, 3)


def test_unknown_url_is_a_key_error() -> None:
    assert typeurl.lookup("containerd.events.NoSuchThing") is None
    with pytest.raises(KeyError):
        typeurl.unmarshal("containerd.events.NoSuchThing", b"")


def test_lookup_of_a_loaded_type_imports_no_other_generated_module() -> None:
    # The daemon's first Streaming call looks up a transfer type: importing every generated module
    # for it cost 40-70 ms on each fresh daemon.
    code = (
        "import sys\n"
        "from pyctr.api import typeurl\n"
        "from pyctr.api._pb.containerd.types import transfer\n"
        "before = {m for m in sys.modules if m.startswith('pyctr.api._pb.')}\n"
        "assert typeurl.lookup('type.googleapis.com/containerd.types.transfer.Progress') is transfer.Progress\n"
        "assert typeurl.lookup('containerd.types.transfer.Progress') is transfer.Progress\n"
        "after = {m for m in sys.modules if m.startswith('pyctr.api._pb.')}\n"
        "print(sorted(after - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
