"""The Content service's hand-coded Read and Write messages agree with the generated classes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyctr.api._pb.containerd.services.content import v1 as pb
from pyctr.daemon.services.content import ReadArgs, ReadReply, ReadRequestCodec, WriteRequestCodec

int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
text = st.text(max_size=300)


@settings(max_examples=300, deadline=None)
@given(offset=int64, data=st.binary(max_size=70_000))
def test_read_reply_encodes_as_generated(offset: int, data: bytes) -> None:
    assert ReadReply(offset, data).SerializeToString() == bytes(
        pb.ReadContentResponse(offset=offset, data=data)
    )


@settings(max_examples=300, deadline=None)
@given(digest=text, offset=int64, size=int64, tail=st.binary(max_size=8))
def test_read_request_decodes_as_generated(digest: str, offset: int, size: int, tail: bytes) -> None:
    body = bytes(pb.ReadContentRequest(digest=digest, offset=offset, size=size))
    assert ReadRequestCodec.FromString(memoryview(body)) == ReadArgs(digest, offset, size)
    # Whatever follows (another field, garbage the generated parser copes with) decides alike.
    odd = body + tail
    try:
        expected = pb.ReadContentRequest.FromString(odd)
    except Exception as exc:
        try:
            ReadRequestCodec.FromString(odd)
        except Exception as got:
            assert type(got) is type(exc)
            return
        raise AssertionError(f"generated parser failed ({exc!r}), ours did not") from None
    assert ReadRequestCodec.FromString(odd) == ReadArgs(expected.digest, expected.offset, expected.size)


def _fields(m: pb.WriteContentRequest) -> tuple[object, ...]:
    return (m.action, m.ref, m.total, m.expected, m.offset, bytes(m.data), dict(m.labels))


@settings(max_examples=300, deadline=None)
@given(
    action=st.sampled_from([0, 1, 2, 7]),
    ref=text,
    total=int64,
    expected=text,
    offset=int64,
    data=st.binary(max_size=70_000),
    labels=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    again=st.one_of(st.none(), int64),
)
def test_write_request_decodes_as_generated(
    action: int,
    ref: str,
    total: int,
    expected: str,
    offset: int,
    data: bytes,
    labels: dict[str, str],
    again: int | None,
) -> None:
    msg = pb.WriteContentRequest(
        action=pb.WriteAction(action),
        ref=ref,
        total=total,
        expected=expected,
        offset=offset,
        data=data,
        labels=labels,
    )
    body = bytes(msg)
    if again is not None:  # a repeated scalar: the last one wins
        body += bytes(pb.WriteContentRequest(offset=again))
    got = WriteRequestCodec.FromString(memoryview(body))
    assert _fields(got) == _fields(pb.WriteContentRequest.FromString(body))


def test_write_request_data_is_a_view_not_a_copy() -> None:
    body = memoryview(bytes(pb.WriteContentRequest(action=pb.WriteAction.WRITE, data=b"x" * 100_000)))
    got = WriteRequestCodec.FromString(body)
    assert isinstance(got.data, memoryview) and got.data.obj is body.obj
