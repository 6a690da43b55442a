"""The lean client under ``pyctr images pull|push``: hand-encoded messages byte for byte what the
generated classes encode, decoding what they encode, and the HTTP/2 header decoding that hands
over to ``hpack`` when a server uses more of HPACK than pyctrd does."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hpack import Encoder

from pyctr.api import pblite, platforms, typeurl
from pyctr.api._pb.containerd.services.streaming.v1 import StreamInit
from pyctr.api._pb.containerd.services.transfer.v1 import TransferOptions, TransferRequest
from pyctr.api._pb.containerd.types import Platform as PbPlatform
from pyctr.api._pb.containerd.types import transfer as tt
from pyctr.api._pb.google.protobuf import Any as PbAny
from pyctr.api.grpclite import Call, Channel, _decode_simple
from pyctr.api.h2wire import literal
from pyctr.ctr import transfer


def any_of(message: object) -> bytes:
    url, value = typeurl.marshal(message)  # type: ignore[arg-type]
    return bytes(PbAny(type_url=url, value=value))


def test_image_store_matches_the_generated_encoding() -> None:
    amd64, arm = ("linux", "amd64", ""), ("linux", "arm", "v7")
    got = transfer.image_store(
        labels={"a": "1", "b": ""},
        platforms=[amd64, arm],
        all_metadata=True,
        unpacks=[(amd64, "overlayfs"), (arm, "native")],
    )
    want = tt.ImageStore(
        labels={"a": "1", "b": ""},
        platforms=[PbPlatform(os="linux", architecture="amd64"), PbPlatform("linux", "arm", "v7")],
        all_metadata=True,
        unpacks=[
            tt.UnpackConfiguration(platform=PbPlatform("linux", "amd64"), snapshotter="overlayfs"),
            tt.UnpackConfiguration(platform=PbPlatform("linux", "arm", "v7"), snapshotter="native"),
        ],
    )
    assert got == bytes(want)
    assert transfer.image_store(name="r/x:1") == bytes(tt.ImageStore(name="r/x:1"))


def test_registry_request_and_stream_init_match_the_generated_encoding() -> None:
    for auth in ("", "auth-1-2"):
        reg = transfer.oci_registry("127.0.0.1:5000/a/b:c", auth)
        want = tt.OciRegistry(
            reference="127.0.0.1:5000/a/b:c", resolver=tt.RegistryResolver(auth_stream=auth)
        )
        assert reg == bytes(want)
    src = pblite.any_(transfer.T_OCI_REGISTRY, transfer.oci_registry("r:1"))
    dst = pblite.any_(transfer.T_IMAGE_STORE, transfer.image_store(name="r:1"))
    assert src == any_of(tt.OciRegistry(reference="r:1", resolver=tt.RegistryResolver()))
    assert dst == any_of(tt.ImageStore(name="r:1"))
    request = TransferRequest(
        source=PbAny.parse(src), destination=PbAny.parse(dst), options=TransferOptions(progress_stream="p-1")
    )
    assert transfer.transfer_request(src, dst, "p-1") == bytes(request)
    assert transfer.stream_init("progress-1-2") == any_of(StreamInit(id="progress-1-2"))


@pytest.mark.parametrize(
    ("kind", "secret", "user", "message"),
    [
        (transfer.AUTH_NONE, "", "", tt.AuthResponse(auth_type=tt.AuthType.NONE)),
        (transfer.AUTH_REFRESH, "tok", "", tt.AuthResponse(auth_type=tt.AuthType.REFRESH, secret="tok")),
        (
            transfer.AUTH_CREDENTIALS,
            "pw",
            "me",
            tt.AuthResponse(auth_type=tt.AuthType.CREDENTIALS, secret="pw", username="me"),
        ),
    ],
)
def test_auth_response_matches_the_generated_encoding(
    kind: int, secret: str, user: str, message: tt.AuthResponse
) -> None:
    assert transfer.auth_response(kind, secret, user) == any_of(message)


def test_progress_and_auth_request_decode_what_the_generated_code_encodes() -> None:
    msg = tt.Progress(event="downloading", name="sha256:ab", parents=["p1", "p2"], progress=5, total=1 << 40)
    kind, value = transfer.unpack_any(any_of(msg))
    assert kind == transfer.T_PROGRESS
    p = transfer.Progress.decode(value)
    assert (p.event, p.name, p.parents, p.progress, p.total) == (
        "downloading",
        "sha256:ab",
        ["p1", "p2"],
        5,
        1 << 40,
    )
    assert transfer.Progress.decode(bytes(tt.Progress(progress=-1))).progress == -1
    # The type URL may come with Google's prefix, as containerd 1.7+ writes it.
    prefixed = bytes(PbAny(type_url="type.googleapis.com/" + transfer.T_PROGRESS, value=bytes(msg)))
    assert transfer.unpack_any(prefixed)[0] == transfer.T_PROGRESS
    request = tt.AuthRequest(host="127.0.0.1:5001", reference="127.0.0.1:5001/a:b", wwwauthenticate=["Basic"])
    kind, value = transfer.unpack_any(any_of(request))
    assert kind == transfer.T_AUTH_REQUEST
    assert transfer.auth_request_host(value) == "127.0.0.1:5001"
    with pytest.raises(ValueError):
        list(pblite.fields(b"\x0a\x05ab"))  # a string field longer than the message


def test_host_platform_is_the_api_default() -> None:
    d = platforms.default()
    assert transfer.host_platform() == (d.os, d.architecture, d.variant)
    assert transfer.parse_platform("linux/arm64/v8") == ("linux", "arm64", "")


def test_header_blocks_pyctrd_sends_decode_without_hpack() -> None:
    block = b"\x88" + literal("grpc-status", "5") + b"\x0f\x10" + b"\x10application/grpc"
    assert _decode_simple(block) == [
        (":status", "200"),
        ("grpc-status", "5"),
        ("content-type", "application/grpc"),
    ]


def test_a_server_using_huffman_and_the_dynamic_table_hands_over_to_hpack() -> None:
    enc = Encoder()  # Huffman strings and incremental indexing, as Go's gRPC sends them
    channel = Channel("/nonexistent")
    call = Call(channel, 1)
    channel.calls[1] = call
    first = enc.encode([(":status", "200"), ("content-type", "application/grpc")], huffman=True)
    channel._frame_in(1, 0x4, 1, first)  # HEADERS, END_HEADERS
    assert channel._hpack is not None and not call.done
    trailers = enc.encode([("grpc-status", "5"), ("grpc-message", "image %22x%22: not found")], huffman=True)
    channel._frame_in(1, 0x4 | 0x1, 1, trailers)
    assert call.done and call.status == 5
    assert str(call.error()) == 'image "x": not found'
    # The second block refers to entries the first one added: decoded with the same table.
    call2 = Call(channel, 3)
    channel.calls[3] = call2
    channel._frame_in(1, 0x4 | 0x1, 3, enc.encode([(":status", "200"), ("grpc-status", "0")], huffman=True))
    assert call2.done and call2.error() is None


def test_pull_imports_no_event_loop_grpclib_or_generated_code() -> None:
    """What ``pyctr images pull`` loads before it talks to the daemon stays small (see
    pyctr.ctr.transfer): the start-up is most of a small pull's time."""
    code = (
        "import sys\n"
        "from pyctr.ctr import main\n"
        "args = main.parser(['images', 'pull', 'r']).parse_args(['images', 'pull', 'r'])\n"
        "from pyctr.ctr import transfer\n"
        "transfer.image_store(unpacks=[(transfer.host_platform(), 'overlayfs')])\n"
        "bad = [m for m in ('asyncio', 'grpclib', 'betterproto2', 'dataclasses', 'typing', 'json', 'subprocess')\n"
        "       if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_pblite_any_reads_back_what_it_writes() -> None:
    """``unpack_any`` (the CLI's progress stream, the shim's start options) inverts ``any_``."""
    assert pblite.unpack_any(pblite.any_("types.containerd.io/x.Y", b"\x08\x01")) == (
        "types.containerd.io/x.Y",
        b"\x08\x01",
    )
    assert pblite.unpack_any(b"") == ("", b"")
    assert transfer.unpack_any(pblite.any_("type.googleapis.com/a.B", b"v")) == ("a.B", b"v")
