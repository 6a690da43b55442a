"""The committed api/_pb matches what protogen makes from api/proto, and its wire shape is containerd's.

Byte strings below are hand-encoded protobuf: a tag byte is ``field_number << 3 | wire_type``
(wire type 2 = length-delimited), then the length, then the payload.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from grpclib.const import Cardinality

from pyctr.api import protogen
from pyctr.api._pb.containerd.events import SnapshotPrepare
from pyctr.api._pb.containerd.services.containers.v1 import Container
from pyctr.api._pb.containerd.services.diff.v1 import DiffResponse
from pyctr.api._pb.containerd.services.images.v1 import GetImageResponse, Image
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest as CreateLeaseRequest
from pyctr.api._pb.containerd.services.tasks.v1 import CreateTaskRequest
from pyctr.api._pb.containerd.types import Descriptor, Mount

COMMITTED = Path(protogen.__file__).resolve().parent / "_pb"

UU, US, SS = Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM


def _uu(*rpcs: str) -> dict[str, tuple[str, Cardinality]]:
    """Unary RPCs whose Python method is the lower-cased name."""
    return {rpc: (rpc.lower(), UU) for rpc in rpcs}


# containerd-api.md §1, plus the shim and health services: module, Base class, service full
# name, and {RPC name: (python method, cardinality)}.
SERVICES: list[tuple[str, str, str, dict[str, tuple[str, Cardinality]]]] = [
    (
        "containerd.services.namespaces.v1",
        "NamespacesBase",
        "containerd.services.namespaces.v1.Namespaces",
        _uu("Get", "List", "Create", "Update", "Delete"),
    ),
    (
        "containerd.services.content.v1",
        "ContentBase",
        "containerd.services.content.v1.Content",
        {
            "Info": ("info", UU),
            "Update": ("update", UU),
            "List": ("list", US),
            "Delete": ("delete", UU),
            "Read": ("read", US),
            "Status": ("status", UU),
            "ListStatuses": ("list_statuses", UU),
            "Write": ("write", SS),
            "Abort": ("abort", UU),
        },
    ),
    (
        "containerd.services.snapshots.v1",
        "SnapshotsBase",
        "containerd.services.snapshots.v1.Snapshots",
        {
            **_uu("Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "Cleanup"),
            "List": ("list", US),
        },
    ),
    (
        "containerd.services.images.v1",
        "ImagesBase",
        "containerd.services.images.v1.Images",
        _uu("Get", "List", "Create", "Update", "Delete"),
    ),
    (
        "containerd.services.containers.v1",
        "ContainersBase",
        "containerd.services.containers.v1.Containers",
        {
            **_uu("Get", "List", "Create", "Update", "Delete"),
            "ListStream": ("list_stream", US),
        },
    ),
    (
        "containerd.services.tasks.v1",
        "TasksBase",
        "containerd.services.tasks.v1.Tasks",
        {
            "Create": ("create", UU),
            "Start": ("start", UU),
            "Delete": ("delete", UU),
            "DeleteProcess": ("delete_process", UU),
            "Get": ("get", UU),
            "List": ("list", UU),
            "Kill": ("kill", UU),
            "Exec": ("exec", UU),
            "ResizePty": ("resize_pty", UU),
            "CloseIO": ("close_io", UU),
            "Pause": ("pause", UU),
            "Resume": ("resume", UU),
            "ListPids": ("list_pids", UU),
            "Checkpoint": ("checkpoint", UU),
            "Update": ("update", UU),
            "Metrics": ("metrics", UU),
            "Wait": ("wait", UU),
        },
    ),
    (
        "containerd.services.events.v1",
        "EventsBase",
        "containerd.services.events.v1.Events",
        {"Publish": ("publish", UU), "Forward": ("forward", UU), "Subscribe": ("subscribe", US)},
    ),
    (
        "containerd.services.events.ttrpc.v1",
        "EventsBase",
        "containerd.services.events.ttrpc.v1.Events",
        {"Forward": ("forward", UU)},
    ),
    (
        "containerd.services.leases.v1",
        "LeasesBase",
        "containerd.services.leases.v1.Leases",
        {
            "Create": ("create", UU),
            "Delete": ("delete", UU),
            "List": ("list", UU),
            "AddResource": ("add_resource", UU),
            "DeleteResource": ("delete_resource", UU),
            "ListResources": ("list_resources", UU),
        },
    ),
    (
        "containerd.services.introspection.v1",
        "IntrospectionBase",
        "containerd.services.introspection.v1.Introspection",
        {"Plugins": ("plugins", UU), "Server": ("server", UU)},
    ),
    (
        "containerd.services.version.v1",
        "VersionBase",
        "containerd.services.version.v1.Version",
        {"Version": ("version", UU)},
    ),
    (
        "containerd.services.diff.v1",
        "DiffBase",
        "containerd.services.diff.v1.Diff",
        {"Apply": ("apply", UU), "Diff": ("diff", UU)},
    ),
    (
        "containerd.services.streaming.v1",
        "StreamingBase",
        "containerd.services.streaming.v1.Streaming",
        {"Stream": ("stream", SS)},
    ),
    (
        "containerd.services.transfer.v1",
        "TransferBase",
        "containerd.services.transfer.v1.Transfer",
        {"Transfer": ("transfer", UU)},
    ),
    (
        "containerd.task.v2",
        "TaskBase",
        "containerd.task.v2.Task",
        {
            "State": ("state", UU),
            "Create": ("create", UU),
            "Start": ("start", UU),
            "Delete": ("delete", UU),
            "Pids": ("pids", UU),
            "Pause": ("pause", UU),
            "Resume": ("resume", UU),
            "Checkpoint": ("checkpoint", UU),
            "Kill": ("kill", UU),
            "Exec": ("exec", UU),
            "ResizePty": ("resize_pty", UU),
            "CloseIO": ("close_io", UU),
            "Update": ("update", UU),
            "Wait": ("wait", UU),
            "Stats": ("stats", UU),
            "Connect": ("connect", UU),
            "Shutdown": ("shutdown", UU),
        },
    ),
    (
        "grpc.health.v1",
        "HealthBase",
        "grpc.health.v1.Health",
        {"Check": ("check", UU), "Watch": ("watch", US)},
    ),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_code_matches_generator(tmp_path: Path) -> None:
    out = tmp_path / "_pb"
    assert protogen.main([str(out)]) == 0
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run `make proto`: generated file set differs"
    stale = [name for name in sorted(fresh) if fresh[name] != committed[name]]
    assert not stale, f"run `make proto`: these files differ from the generator's output: {stale}"


def test_every_generated_module_is_marked() -> None:
    for name, data in _tree(COMMITTED).items():
        if name.endswith(".py"):
            assert data.startswith(protogen.MARKER.encode() + b"\n"), name


def test_generated_code_imports_without_protobuf() -> None:
    # A fresh interpreter, so modules this process already imported do not hide the dependency.
    modules = sorted(
        "pyctr.api._pb." + ".".join(p.parent.relative_to(COMMITTED).parts)
        for p in COMMITTED.rglob("__init__.py")
        if p.parent != COMMITTED
    )
    code = (
        "import importlib, sys\n"
        "sys.modules['google.protobuf'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.parametrize(("module", "base", "service", "methods"), SERVICES, ids=[s[2] for s in SERVICES])
def test_service_base_has_containerd_methods(
    module: str, base: str, service: str, methods: dict[str, tuple[str, Cardinality]]
) -> None:
    cls = getattr(importlib.import_module(f"pyctr.api._pb.{module}"), base)
    mapping = cls().__mapping__()
    assert sorted(mapping) == sorted(f"/{service}/{rpc}" for rpc in methods)
    for rpc, (py_name, cardinality) in methods.items():
        assert mapping[f"/{service}/{rpc}"].cardinality is cardinality, rpc
        handler = getattr(cls, py_name)
        assert inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler), py_name


def test_descriptor_annotations_is_field_5() -> None:
    # field 5 map entry {key "a" (1), value "b" (2)}
    assert bytes(Descriptor(annotations={"a": "b"})) == b"\x2a\x06\x0a\x01a\x12\x01b"


def test_image_created_at_is_field_7() -> None:
    created = datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.UTC)
    # field 7 Timestamp{seconds (1) = 1}
    assert bytes(Image(created_at=created)) == b"\x3a\x02\x08\x01"
    assert Image.parse(b"\x3a\x02\x08\x01").created_at == created


def test_create_task_rootfs_is_field_3() -> None:
    assert bytes(CreateTaskRequest(rootfs=[Mount(type="bind")])) == b"\x1a\x06\x0a\x04bind"


def test_lease_create_labels_is_field_3() -> None:
    assert bytes(CreateLeaseRequest(labels={"k": "v"})) == b"\x1a\x06\x0a\x01k\x12\x01v"


def test_diff_response_diff_is_field_3() -> None:
    assert bytes(DiffResponse(diff=Descriptor(digest="d"))) == b"\x1a\x03\x12\x01d"


def test_explicit_empty_submessage_is_sent() -> None:
    # Go clients dereference GetImageResponse.image; an empty Image must still be on the wire.
    assert bytes(GetImageResponse(image=Image())) == b"\n\x00"
    assert bytes(DiffResponse(diff=Descriptor())) == b"\x1a\x00"
    assert GetImageResponse.parse(b"\n\x00").image is not None
    assert bytes(GetImageResponse()) == b""


def test_containerd_17_additive_fields() -> None:
    assert bytes(Container(sandbox="s")) == b"\x5a\x01s"  # field 11
    assert bytes(SnapshotPrepare(snapshotter="o")) == b"\x2a\x01o"  # field 5


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(protogen.ProtogenError, match="not written by protogen"):
        protogen.install(tmp_path / "staging", tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_own_grpc_bases_are_betterproto2s() -> None:
    """``pyctr.api.pbgrpc`` is a copy of betterproto2's two base classes (to keep grpclib's server
    out of every import of generated code); a betterproto2 upgrade must refresh it."""
    import betterproto2.grpclib.grpclib_client as upstream_client
    import betterproto2.grpclib.grpclib_server as upstream_server

    from pyctr.api import pbgrpc

    assert importlib.metadata.version("betterproto2") == "0.10.0"
    for ours, theirs in (
        (pbgrpc.ServiceStub, upstream_client.ServiceStub),
        (pbgrpc.ServiceBase, upstream_server.ServiceBase),
    ):
        own = {k: v for k, v in vars(ours).items() if not k.startswith("__") or k == "__init__"}
        upstream = {k: v for k, v in vars(theirs).items() if not k.startswith("__") or k == "__init__"}
        assert sorted(own) == sorted(upstream)
        for name, value in own.items():
            if name == "_abc_impl":
                continue
            mine, other = (
                getattr(value, "__func__", value),
                getattr(upstream[name], "__func__", upstream[name]),
            )
            assert mine.__code__.co_code == other.__code__.co_code, name


def test_generated_code_does_not_import_grpclib_server() -> None:
    code = (
        "import sys\n"
        "import pyctr.api._pb.containerd.services.tasks.v1, pyctr.api._pb.google.protobuf\n"
        "print(' '.join(m for m in ('grpclib.server', 'h2', 'dateutil') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


def test_betterproto2_version_stand_in_agrees_with_betterproto2() -> None:
    """``pyctr.api.bp2version`` replaces ``betterproto2._version`` (to keep importlib.metadata out):
    the same version, and the same verdict on compiler versions as betterproto2's own check."""
    import importlib.util

    import betterproto2

    from pyctr.api import bp2version

    assert sys.modules[bp2version.MODULE].__version__ == betterproto2.__version__
    assert betterproto2.__version__ == importlib.metadata.version("betterproto2")
    path = Path(betterproto2.__file__).parent / "_version.py"
    spec = importlib.util.spec_from_file_location("upstream_bp2_version", path)
    assert spec is not None and spec.loader is not None
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)
    major, minor, _ = betterproto2.__version__.split(".", 2)
    for compiler in (
        f"{major}.{minor}.0",
        f"{major}.{minor}.99",
        f"{major}.{int(minor) + 1}.0",
        "9.0.0",
        "0.0.1",
    ):
        verdicts = []
        for check in (upstream.check_compiler_version, bp2version.check_compiler_version):
            try:
                check(compiler)
                verdicts.append(True)
            except ImportError:
                verdicts.append(False)
        assert verdicts[0] == verdicts[1], compiler
