"""Checkpoint and restore (criu, through runc), on pyctrd and containerd side by side.

The real ``ctr tasks checkpoint`` makes the checkpoint image on both daemons; ``pyctr tasks start
--checkpoint`` restores from it (ctr 1.6 has no working restore: ``ctr containers checkpoint
--task`` drops the task's descriptors, so ``ctr containers restore`` finds no spec), also against
containerd, so both daemons' Create-from-checkpoint are compared through one client. pyctrd runs
each shim of ``SHIMS`` (the Go shim checks the daemon alone).

These tests need a criu that works on this kernel (``criu check``): criu 3.17, Debian 12's, stops at
the vDSO of 6.x kernels. Without one they are skipped, and the refusal is tested instead
(test_ctr_run.py). The restore paths that fail before criu runs are tested either way.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import tarfile
import time

import pytest

from pyctr.api import binaries
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.ctr.contentio import read_blob, write_blob
from tests.helpers import criu, daemons
from tests.helpers.streams import LineReader, stop_process
from tests.interop import test_ctr_run
from tests.interop.test_ctr_run import Ctr, unique

# test_ctr_run's side-by-side fixtures: pyctrd on each shim and containerd, busybox pulled on both.
pyd = test_ctr_run.pyd
pulled = test_ctr_run.pulled
both = test_ctr_run.both

pytestmark = pytest.mark.interop


CRIU_MISSING = criu.unusable()
needs_criu = criu.needed

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done"
INDEX = "application/vnd.oci.image.index.v1+json"
CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def pyctr(ctr: Ctr, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return daemons.run([daemons.PYCTR, "-a", ctr.d.address, "-n", ctr.ns, *args], timeout=timeout)


def counter(ctr: Ctr, cid: str) -> int:
    """The counter's value inside the container (it counts every 50 ms from its start)."""
    deadline = time.monotonic() + 10
    while True:
        r = ctr("tasks", "exec", "--exec-id", unique("cat"), cid, "cat", "/tmp/n")
        if r.returncode == 0 and r.stdout.strip():
            return int(r.stdout)
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.1)


def run_counter(ctr: Ctr, cid: str) -> str:
    ctr.ok("run", "-d", ctr.image, cid, "sh", "-c", COUNTER)
    counter(ctr, cid)
    return ctr.tasks()[cid][0]


def blob(ctr: Ctr, digest: str) -> bytes:
    r = subprocess.run(ctr.argv("content", "get", digest), capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def image_row(ctr: Ctr, name: str) -> list[str]:
    for line in ctr.ok("images", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == name:
            return cols
    raise AssertionError(f"no image {name}")


@pytest.mark.skipif(CRIU_MISSING is None, reason="criu works here: the checkpoint tests run instead")
def test_checkpoint_without_a_working_criu_fails_clearly(both: tuple[Ctr, Ctr]) -> None:
    """`ctr tasks checkpoint` pauses the task, asks, and resumes it: pyctrd's refusal names what
    this host lacks, before anything is dumped, and leaves the task as it was, as containerd's
    failure (its shim's criu fails) does."""
    results = []
    for ctr in both:
        cid = unique("ckpt")
        ctr.ok("run", "-d", ctr.image, cid, "sleep", "1000")
        pid = ctr.tasks()[cid][0]
        r = ctr("tasks", "checkpoint", cid)
        results.append(r)
        assert ctr.tasks()[cid] == [pid, "RUNNING"], r.stderr
        assert r.returncode != 0
    py = results[0].stderr
    if binaries.criu() is None:
        assert "checkpoint needs criu, which is not installed" in py, py
    else:
        assert "`criu check` fails on this host" in py and "failed precondition" in py, py


@needs_criu
def test_checkpoint_image_is_containerds(both: tuple[Ctr, Ctr]) -> None:
    """``ctr tasks checkpoint``: the task keeps running, and the image has containerd's layout."""
    seen = []
    for ctr in both:
        cid = unique("ckpt")
        pid = run_counter(ctr, cid)
        r = ctr("tasks", "checkpoint", cid)
        assert r.returncode == 0, (r.stderr, ctr.d.log()[-3000:])
        name = r.stdout.strip()
        assert re.fullmatch(rf"containerd\.io/checkpoint/{cid}:\d\d-\d\d-\d{{4}}-\d\d:\d\d:\d\d", name), name
        assert ctr.tasks()[cid] == [pid, "RUNNING"]
        before = counter(ctr, cid)
        time.sleep(0.3)
        assert counter(ctr, cid) > before  # resumed after the pause around the checkpoint

        row = image_row(ctr, name)
        assert row[1] == INDEX and row[-1] == "containerd.io/checkpoint=true", row
        listed = pyctr(ctr, "images", "ls")
        assert listed.returncode == 0, listed.stderr
        mine = next(line.split() for line in listed.stdout.splitlines() if line.startswith(name + " "))
        # pyctr sizes it as ctr does (the index and criu's tar), and names its one platform.
        assert mine[3] != "0B" and mine[4] == "linux/amd64", mine
        index = json.loads(blob(ctr, row[2]))
        manifests = index["manifests"]
        by_type = {m["mediaType"]: m for m in manifests}
        files = sorted(
            os.path.basename(m.name)
            for m in tarfile.open(fileobj=io.BytesIO(blob(ctr, by_type[CRIU_TAR]["digest"])))
        )
        spec = PbAny.parse(blob(ctr, by_type[CONFIG]["digest"]))
        info = json.loads(ctr.ok("containers", "info", cid))
        seen.append(
            {
                "media types": [m["mediaType"] for m in manifests],
                "platforms": [m.get("platform") for m in manifests],
                "annotations": index["annotations"],
                "image manifest annotations": sorted(by_type[MANIFEST].get("annotations", {})),
                "criu files": {"inventory.img", "descriptors.json", "pstree.img"} <= set(files),
                "spec type": spec.type_url,
                "spec": json.loads(spec.value) == info["Spec"],
            }
        )
        assert seen[-1]["annotations"] == {"image.name": ctr.image}
        # The content is the image's: gc references hold every blob the index names.
        labels = ctr.ok("content", "ls").splitlines()
        index_row = next(line for line in labels if line.startswith(row[2]))
        for i, m in enumerate(manifests):
            assert f"containerd.io/gc.ref.content.{i}={m['digest']}" in index_row
    assert seen[0] == seen[1], seen
    assert seen[0]["media types"] == [CRIU_TAR, CONFIG, MANIFEST, LAYER_GZIP]
    assert seen[0]["criu files"] and seen[0]["spec"]


@needs_criu
def test_checkpoint_exit_and_image_path(both: tuple[Ctr, Ctr], tmp_path: str) -> None:
    """``--exit`` stops the task after the checkpoint; ``--image-path`` leaves criu's files in a
    directory and makes no image."""
    seen = []
    for n, ctr in enumerate(both):
        cid = unique("ckexit")
        run_counter(ctr, cid)
        images_before = ctr.ok("images", "ls", "-q")
        target = os.path.join(str(tmp_path), f"images-{n}")
        r = ctr("tasks", "checkpoint", "--image-path", target, cid)
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        assert os.path.exists(os.path.join(target, "inventory.img"))
        assert ctr.ok("images", "ls", "-q") == images_before
        assert ctr.tasks()[cid][1] == "RUNNING"

        r = ctr("tasks", "checkpoint", "--exit", cid)
        assert r.returncode == 0, r.stderr
        row = ctr.wait_status(cid, "STOPPED")
        r = ctr("tasks", "rm", cid)
        seen.append({"stopped": row[1], "rm": (r.returncode, r.stdout)})
    assert seen[0] == seen[1], seen


@needs_criu
def test_restore_from_checkpoint_image(both: tuple[Ctr, Ctr]) -> None:
    """Checkpoint with --exit, delete the task, create it again from the image: the counter goes
    on from where it was, in a new process, which exec, kill and delete treat as any other."""
    seen = []
    for ctr in both:
        cid = unique("restore")
        run_counter(ctr, cid)
        r = pyctr(ctr, "tasks", "checkpoint", "--exit", cid)
        assert r.returncode == 0, (r.stderr, ctr.d.log()[-3000:])
        name = r.stdout.strip()
        ctr.wait_status(cid, "STOPPED")
        at_checkpoint = counter_file(ctr, cid)
        ctr.ok("tasks", "rm", cid)

        r = pyctr(ctr, "tasks", "start", "-d", "--checkpoint", name, cid)
        assert r.returncode == 0, (r.stderr, ctr.d.log()[-3000:])
        pid, status = ctr.tasks()[cid]
        value = counter(ctr, cid)
        assert value >= at_checkpoint, (value, at_checkpoint)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [b"sh", b"-c"]
        time.sleep(0.3)
        assert counter(ctr, cid) > value
        if ctr is both[0]:
            # A SIGKILLed pyctrd comes back to the restored task like to any other.
            assert ctr.d.proc is not None
            ctr.d.proc.kill()
            ctr.d.proc.wait()
            daemons.restart(ctr.d)
            assert ctr.tasks()[cid] == [pid, "RUNNING"]
        ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
        row = ctr.wait_status(cid, "STOPPED")
        r = ctr("tasks", "rm", cid)
        seen.append(
            {"status": status, "stopped": row[1], "rm": r.returncode, "restored": value >= at_checkpoint}
        )
    assert seen[0] == seen[1], seen


def counter_file(ctr: Ctr, cid: str) -> int:
    """The counter as the container's rw layer has it (the task is stopped: read the snapshot)."""
    info = json.loads(ctr.ok("containers", "info", cid))
    r = ctr("snapshots", "--snapshotter", info["Snapshotter"], "mounts", "/tmp/unused", info["SnapshotKey"])
    upper = re.search(r"upperdir=([^,\s]+)", r.stdout)
    assert upper, r.stdout
    with open(os.path.join(upper.group(1), "tmp", "n")) as f:
        return int(f.read())


@needs_criu
def test_restore_in_the_foreground_streams_output(both: tuple[Ctr, Ctr]) -> None:
    """The restored process writes to the stdio of the task created from the checkpoint (runc
    hands criu the new pipes in place of the old ones), and its exit ends ``pyctr tasks start``."""
    seen = []
    for ctr in both:
        cid = unique("rsout")
        ctr.ok("run", "-d", ctr.image, cid, "sh", "-c", COUNTER.replace("echo $i >", "echo $i; echo $i >"))
        counter(ctr, cid)
        r = pyctr(ctr, "tasks", "checkpoint", "--exit", cid)
        assert r.returncode == 0, r.stderr
        ctr.wait_status(cid, "STOPPED")
        at_checkpoint = counter_file(ctr, cid)
        ctr.ok("tasks", "rm", cid)
        proc = subprocess.Popen(
            [
                daemons.PYCTR,
                "-a",
                ctr.d.address,
                "-n",
                ctr.ns,
                "tasks",
                "start",
                "--checkpoint",
                r.stdout.strip(),
                cid,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            reader = LineReader(proc)
            lines = [reader.readline(10) for _ in range(3)]
            assert None not in lines, (lines, proc.poll(), ctr.d.log()[-3000:])
            values = [int(line) for line in lines if line is not None]
            ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
            code = proc.wait(15)
        finally:
            stop_process(proc)
        assert values == sorted(values) and values[0] >= at_checkpoint, (values, at_checkpoint)
        seen.append({"exit code": code, "tasks": cid in ctr.tasks()})
    assert seen[0] == seen[1] == {"exit code": 137, "tasks": False}, seen


@needs_criu
def test_restore_a_removed_container(both: tuple[Ctr, Ctr]) -> None:
    """The container is gone too: ``pyctr containers restore --live --rw`` makes it again from the
    real ctr's checkpoint image (its image, spec and runtime, its read-write layer) and resumes the
    process; ctr 1.6's own ``containers restore`` cannot read a task checkpoint."""
    seen = []
    for ctr in both:
        cid = unique("gone")
        run_counter(ctr, cid)
        ctr.ok("tasks", "exec", "--exec-id", "mark", cid, "sh", "-c", "echo kept > /marker")
        before = json.loads(ctr.ok("containers", "info", cid))
        name = ctr.ok("tasks", "checkpoint", "--exit", cid).strip()
        ctr.wait_status(cid, "STOPPED")
        at_checkpoint = counter_file(ctr, cid)
        ctr.ok("tasks", "rm", cid)
        ctr.ok("containers", "rm", cid)

        r = pyctr(ctr, "containers", "restore", "--live", "--rw", "-d", cid, name)
        assert r.returncode == 0, (r.stderr, ctr.d.log()[-3000:])
        after = json.loads(ctr.ok("containers", "info", cid))
        value = counter(ctr, cid)
        marker = ctr("tasks", "exec", "--exec-id", "cat", cid, "cat", "/marker")
        seen.append(
            {
                "status": ctr.tasks()[cid][1],
                "same": {k: after[k] == before[k] for k in ("Image", "Spec", "Snapshotter", "Runtime")},
                "counter goes on": value >= at_checkpoint,
                "rw layer": marker.stdout,
            }
        )
        ctr.ok("tasks", "kill", "-s", "SIGKILL", cid)
        ctr.wait_status(cid, "STOPPED")
        ctr.ok("tasks", "rm", cid)
        ctr.ok("containers", "rm", cid)
    assert seen[0] == seen[1], seen
    assert seen[0]["status"] == "RUNNING" and seen[0]["rw layer"] == "kept\n", seen
    assert all(seen[0]["same"].values()) and seen[0]["counter goes on"], seen


@needs_criu
def test_a_task_checkpointed_on_containerd_resumes_on_pyctrd(both: tuple[Ctr, Ctr]) -> None:
    """Moving a running task between daemons: checkpointed by containerd, its checkpoint image's
    blobs copied into pyctrd through the Content API (ctr 1.6's ``images export`` fails on a
    checkpoint: it reads criu's tar as a manifest), the container restored there from it; the
    process counts on."""
    py, cd = both
    cid = unique("move")
    run_counter(cd, cid)
    name = cd.ok("tasks", "checkpoint", "--exit", cid).strip()
    cd.wait_status(cid, "STOPPED")
    at_checkpoint = counter_file(cd, cid)
    asyncio.run(copy_image(cd, py, name))
    r = pyctr(py, "containers", "restore", "--live", "--rw", "-d", cid, name)
    assert r.returncode == 0, (r.stderr, py.d.log()[-3000:])
    assert py.tasks()[cid][1] == "RUNNING"
    assert counter(py, cid) >= at_checkpoint


async def copy_image(src: Ctr, dst: Ctr, name: str) -> None:
    """The checkpoint image ``name``: its index and the blobs it names (but the container image,
    which both daemons pulled), from ``src`` to ``dst``, under a lease until the image exists."""
    from pyctr.api._pb.containerd.services.images.v1 import CreateImageRequest, GetImageRequest
    from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, DeleteRequest
    from pyctr.ctr.client import Client

    with Client(src.d.address, src.ns, timeout=30) as a, Client(dst.d.address, dst.ns, timeout=30) as b:
        image = (await a.images.get(GetImageRequest(name=name))).image
        assert image is not None and image.target is not None
        index = await read_blob(a, image.target.digest)
        await b.leases.create(CreateRequest(id="copy-checkpoint"))
        b.lease = "copy-checkpoint"
        labels = {}
        for i, m in enumerate(json.loads(index)["manifests"]):
            labels[f"containerd.io/gc.ref.content.{i}"] = m["digest"]
            if m["mediaType"] != MANIFEST:
                await write_blob(b, m["digest"], await read_blob(a, m["digest"]), {})
        await write_blob(b, image.target.digest, index, labels)
        await b.images.create(CreateImageRequest(image=image))
        b.lease = ""
        await b.leases.delete(DeleteRequest(id="copy-checkpoint"))


@needs_criu
def test_a_checkpoint_travels_as_an_image_archive(both: tuple[Ctr, Ctr], tmp_path: str) -> None:
    """``pyctr images export`` of a checkpoint carries the blobs its index names besides manifests
    (criu's tar, the spec, the rw layer); imported into another namespace, it restores there.
    containerd 1.6 can do neither: its export reads criu's tar as a manifest, its import refuses
    the media type."""
    py = both[0]
    cid = unique("travel")
    run_counter(py, cid)
    name = py.ok("tasks", "checkpoint", "--exit", cid).strip()
    py.wait_status(cid, "STOPPED")
    at_checkpoint = counter_file(py, cid)
    archive = os.path.join(str(tmp_path), "checkpoint.tar")
    r = pyctr(py, "images", "export", archive, name)
    assert r.returncode == 0, r.stderr
    with tarfile.open(archive) as tf:
        names = set(tf.getnames())
    index = json.loads(blob(py, image_row(py, name)[2]))
    assert {f"blobs/sha256/{m['digest'].split(':')[1]}" for m in index["manifests"]} <= names

    there = Ctr(py.exe, py.d, unique("travel-ns"), py.image)
    try:
        there.ok("images", "pull", "--plain-http", py.image)  # the image it was made from
        r = pyctr(there, "images", "import", archive)
        assert r.returncode == 0, r.stderr
        r = pyctr(there, "containers", "restore", "--live", "--rw", "-d", cid, name)
        assert r.returncode == 0, (r.stderr, py.d.log()[-3000:])
        assert there.tasks()[cid][1] == "RUNNING"
        assert counter(there, cid) >= at_checkpoint
    finally:
        there.remove_everything()
        for ref in there.ok("images", "ls", "-q").split():
            there("images", "rm", "--sync", ref)
        there("namespaces", "rm", there.ns)
