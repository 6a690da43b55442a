"""Layer compression: detection by media type and magic, streaming decoders, compressors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tracemalloc

import pytest
import zstandard

from pyctr.api.errdefs import DataLoss, InvalidArgument, NotImplementedErr
from pyctr.snapshotter.layer import compression as comp
from pyctr.snapshotter.layer.compression import Compression

DATA = os.urandom(300_000) + b"\0" * 2_000_000 + b"tail"


class Trickle:
    """A source that returns at most ``n`` bytes per read, like a pipe."""

    def __init__(self, data: bytes, n: int = 3) -> None:
        self._f = io.BytesIO(data)
        self._n = n

    def read(self, size: int = -1) -> bytes:
        return self._f.read(min(self._n, size) if size >= 0 else self._n)


def compress(data: bytes, c: Compression) -> bytes:
    out = io.BytesIO()
    with comp.Compressor(out, c) as w:
        for i in range(0, len(data), 100_000):
            w.write(data[i : i + 100_000])
    return out.getvalue()


def read_all(reader: comp.DecompressingReader, n: int = 65536) -> bytes:
    parts = []
    while chunk := reader.read(n):
        assert len(chunk) <= n
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar", Compression.NONE),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.example.layer+gzip", Compression.GZIP),
        ("application/octet-stream", None),
    ],
)
def test_media_types(media_type: str, expected: Compression | None) -> None:
    assert comp.compression_for_media_type(media_type) is expected


def test_encrypted_layers_are_not_supported() -> None:
    with pytest.raises(NotImplementedErr):
        comp.compression_for_media_type("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")


def test_media_type_for() -> None:
    assert comp.media_type_for(Compression.GZIP) == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert (
        comp.media_type_for(Compression.NONE, docker=True) == "application/vnd.docker.image.rootfs.diff.tar"
    )
    with pytest.raises(InvalidArgument):
        comp.media_type_for(Compression.ZSTD, docker=True)


def test_detection_by_magic() -> None:
    assert comp.detect_compression(gzip.compress(b"x")) is Compression.GZIP
    assert comp.detect_compression(zstandard.ZstdCompressor().compress(b"x")) is Compression.ZSTD
    skippable = struct.pack("<II", 0x184D2A5F, 0)
    assert comp.detect_compression(skippable) is Compression.ZSTD
    assert comp.detect_compression(b"usr/\0\0\0") is Compression.NONE
    assert comp.detect_compression(b"") is Compression.NONE


@pytest.mark.parametrize("c", list(Compression))
def test_round_trip_detected_from_a_trickling_source(c: Compression) -> None:
    blob = compress(DATA, c)
    reader = comp.open_decompressed(Trickle(blob, 4096))
    assert reader.compression is c
    assert read_all(reader, 1 << 20) == DATA


@pytest.mark.parametrize("c", list(Compression))
def test_media_type_decides_over_magic(c: Compression) -> None:
    reader = comp.open_decompressed(io.BytesIO(compress(DATA, c)), media_type=comp.media_type_for(c))
    assert reader.compression is c and reader.read() == DATA


def test_gzip_is_deterministic_and_readable_by_the_stdlib() -> None:
    assert compress(DATA, Compression.GZIP) == compress(DATA, Compression.GZIP)
    assert gzip.decompress(compress(DATA, Compression.GZIP)) == DATA


def test_concatenated_gzip_members_and_nul_padding() -> None:
    blob = gzip.compress(b"one") + gzip.compress(b"two") + b"\0" * 10
    assert read_all(comp.open_decompressed(Trickle(blob, 1))) == b"onetwo"
    # Small reads leave input in the decoder's unconsumed tail across the member boundary.
    big = compress(DATA[:50_000], Compression.GZIP) + compress(DATA[-70_000:], Compression.GZIP)
    assert read_all(comp.open_decompressed(io.BytesIO(big)), 777) == DATA[:50_000] + DATA[-70_000:]


def test_trailing_garbage_after_gzip_is_an_error() -> None:
    with pytest.raises(InvalidArgument):
        read_all(comp.open_decompressed(io.BytesIO(gzip.compress(b"one") + b"junk")))


def test_truncated_gzip_is_data_loss() -> None:
    blob = compress(DATA, Compression.GZIP)
    with pytest.raises(DataLoss):
        read_all(comp.open_decompressed(io.BytesIO(blob[: len(blob) // 2])))
    with pytest.raises(DataLoss):
        read_all(comp.open_decompressed(io.BytesIO(blob[:-4])))


def test_corrupt_gzip_is_invalid() -> None:
    blob = bytearray(compress(DATA, Compression.GZIP))
    blob[20:40] = b"\xff" * 20
    with pytest.raises((InvalidArgument, DataLoss)):
        read_all(comp.open_decompressed(io.BytesIO(bytes(blob))))


def test_zstd_frames_and_skippable_frames() -> None:
    z = zstandard.ZstdCompressor()
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc"
    blob = skippable + z.compress(b"one") + skippable + z.compress(b"two")
    assert read_all(comp.open_decompressed(Trickle(blob, 2))) == b"onetwo"


def test_truncated_zstd_is_data_loss() -> None:
    blob = compress(DATA, Compression.ZSTD)
    for cut in (len(blob) // 2, len(blob) - 3):
        with pytest.raises(DataLoss):
            read_all(comp.open_decompressed(io.BytesIO(blob[:cut])))


def test_zstd_memory_stays_bounded_on_a_run_of_zeros() -> None:
    zeros = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(zeros) < 4096
    reader = comp.open_decompressed(io.BytesIO(zeros))
    total = 0
    tracemalloc.start()
    try:
        while chunk := reader.read(1 << 20):
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert peak < 8 << 20


def test_digesting_streams() -> None:
    reader = comp.DigestingReader(io.BytesIO(DATA))
    reader.read(10)
    reader.drain()
    assert reader.size == len(DATA)
    assert reader.digest == "sha256:" + hashlib.sha256(DATA).hexdigest()
    out = io.BytesIO()
    writer = comp.DigestingWriter(out)
    writer.write(DATA[:5])
    writer.write(memoryview(DATA)[5:])
    assert out.getvalue() == DATA and writer.digest == reader.digest and writer.size == len(DATA)
