"""Images.List and Leases.List over the wire, filtered and not, next to the real containerd.

pyctrd encodes these replies by hand from its records (daemon/services/replies.py); the same
requests to both daemons must list the same records with the same fields. An empty label or
annotation value is not stored by either (containerd's metadata store drops it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from grpclib.client import Channel

from pyctr.api._pb.containerd.services.images.v1 import (
    CreateImageRequest,
    DeleteImageRequest,
    Image,
    ImagesStub,
    ListImagesRequest,
)
from pyctr.api._pb.containerd.services.leases.v1 import CreateRequest, DeleteRequest, LeasesStub, ListRequest
from pyctr.api._pb.containerd.types import Descriptor
from tests.helpers import daemons

NS = "listfilters"
MD = {"containerd-namespace": NS}
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGES = [
    ("registry.example/app:1", MANIFEST, 1, {"team": "a", "tier": "web"}, {"org.opencontainers.x": "y"}),
    ("registry.example/app:2", INDEX, 2, {"team": "b", "unset": ""}, {"empty": ""}),
    ("registry.example/db:1", MANIFEST, 3, {}, {}),
    ("other.example/tool:latest", MANIFEST, 4, {"team": "a", "é": "ü"}, {}),
]
LEASES = [("build-1", {"purpose": "build"}), ("build-2", {"purpose": "build", "x": ""}), ("pull-1", {})]
IMAGE_FILTERS = [
    [],
    ["name==registry.example/app:1"],
    ["name~=^registry"],
    ["labels.team==a"],
    ["labels.team==a,name~=tool"],
    ["labels.team==b", "name==registry.example/db:1"],
    [f"target.mediatype=={INDEX}"],
    [f"target.digest=={'sha256:' + '3' * 64}"],
    ["labels.team"],
    ["labels.nope==x"],
    ["labels.unset"],
]
LEASE_FILTERS = [
    [],
    ["id==build-1"],
    ["id~=^build"],
    ["labels.purpose==build"],
    ["labels.x"],
    ["id==pull-1", "id==build-2"],
]


async def _listings(
    address: str,
) -> tuple[dict[str, list[tuple[object, ...]]], dict[str, list[tuple[object, ...]]]]:
    channel = Channel(path=address)
    try:
        images, leases = ImagesStub(channel, metadata=MD), LeasesStub(channel, metadata=MD)
        for name, media_type, n, labels, annotations in IMAGES:
            target = Descriptor(
                media_type=media_type, digest="sha256:" + str(n) * 64, size=100 + n, annotations=annotations
            )
            await images.create(CreateImageRequest(image=Image(name=name, labels=labels, target=target)))
        for lease_id, labels in LEASES:
            await leases.create(CreateRequest(id=lease_id, labels=labels))
        found_images = {}
        for fs in IMAGE_FILTERS:
            resp = await images.list(ListImagesRequest(filters=fs))
            found_images[",".join(fs)] = [
                (
                    i.name,
                    dict(i.labels),
                    i.target.media_type if i.target else None,
                    i.target.digest if i.target else None,
                    i.target.size if i.target else None,
                    dict(i.target.annotations) if i.target else None,
                    i.created_at is not None and i.created_at.year >= 2024,
                    i.updated_at is not None and i.updated_at >= i.created_at,  # type: ignore[operator]
                )
                for i in resp.images
            ]
        found_leases = {}
        for fs in LEASE_FILTERS:
            resp_l = await leases.list(ListRequest(filters=fs))
            found_leases[",".join(fs)] = [
                (x.id, dict(x.labels), x.created_at is not None and x.created_at.year >= 2024)
                for x in resp_l.leases
            ]
        for name, *_ in IMAGES:
            await images.delete(DeleteImageRequest(name=name))
        for lease_id, _ in LEASES:
            await leases.delete(DeleteRequest(id=lease_id))
        return found_images, found_leases
    finally:
        channel.close()


@pytest.fixture
def both(
    pyctrd: daemons.Daemon, containerd: daemons.Daemon
) -> Iterator[tuple[daemons.Daemon, daemons.Daemon]]:
    yield pyctrd, containerd


def test_filtered_lists_match_containerd(both: tuple[daemons.Daemon, daemons.Daemon]) -> None:
    ours, theirs = (asyncio.run(_listings(d.address)) for d in both)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    # The filters really select (the comparison above would pass if both listed everything).
    assert [row[0] for row in ours[0]["labels.team==a"]] == [
        "other.example/tool:latest",
        "registry.example/app:1",
    ]
    assert [row[0] for row in ours[1]["id~=^build"]] == ["build-1", "build-2"]
    assert ours[0]["labels.nope==x"] == []
