"""Images.List and Leases.List replies encoded by hand: the generated classes' bytes, exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api import pbencode
from pyctr.api._pb.containerd.services.images import v1 as images_pb
from pyctr.api._pb.containerd.services.leases import v1 as leases_pb
from pyctr.daemon.metadata.images import Descriptor, Image
from pyctr.daemon.metadata.leases import Lease
from pyctr.daemon.services import replies
from pyctr.daemon.services.images import image_message
from pyctr.daemon.services.leases import lease_message

text = st.text(max_size=40)
labels = st.dictionaries(text, text, max_size=4)
# Unix ns from 0 (unset) to the year ~2200, with every sub-second part.
stamps = st.one_of(st.just(0), st.integers(min_value=0, max_value=7_258_118_400 * 10**9))
sizes = st.one_of(st.just(0), st.integers(min_value=1, max_value=2**63 - 1))

images = st.builds(
    Image,
    name=text,
    target=st.builds(Descriptor, media_type=text, digest=text, size=sizes, annotations=labels),
    labels=labels,
    created_at=stamps,
    updated_at=stamps,
)
leases = st.builds(Lease, id=text, created_at=stamps, labels=labels)


@settings(max_examples=300, deadline=None)
@given(st.lists(images, max_size=5))
def test_images_list_reply_is_the_generated_encoding(imgs: list[Image]) -> None:
    expected = pbencode.encode(images_pb.ListImagesResponse(images=[image_message(i) for i in imgs]))
    assert replies.repeated(map(replies.image, imgs)).SerializeToString() == expected
    assert bytes(images_pb.ListImagesResponse(images=[image_message(i) for i in imgs])) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(leases, max_size=5))
def test_leases_list_reply_is_the_generated_encoding(found: list[Lease]) -> None:
    expected = bytes(leases_pb.ListResponse(leases=[lease_message(x) for x in found]))
    assert replies.repeated(map(replies.lease, found)).SerializeToString() == expected


def test_an_empty_list_is_an_empty_message() -> None:
    assert replies.repeated([]).SerializeToString() == b""
