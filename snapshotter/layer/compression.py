"""Layer compression: detect it, read through it, write it; and digest a stream as it passes.

Detection follows containerd's ``archive/compression``: the media type when it names one, else
the first bytes (gzip ``1f 8b 08``; zstd ``28 b5 2f fd`` or a skippable frame ``5X 2a 4d 18``);
anything else is an uncompressed tar. Decoders (measured in the shared python-stack notes §5):
``isal_zlib.decompressobj(31)`` for gzip, about 2.4x zlib, and ``zstandard`` for zstd.

Both decoders read concatenated gzip members and zstd frames, as Go's readers do, and raise
``DataLoss`` on a stream cut short: the tar reader alone would accept a cut at a member boundary.
Readers and writers here are blocking; the layer code runs them in a worker thread.
"""

from __future__ import annotations

import enum
import hashlib
from typing import IO, Any, Protocol, cast

import zstandard
from isal import isal_zlib

from pyctr.api.errdefs import DataLoss, InvalidArgument, NotImplementedErr

CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = (0x184D2A50, 0xFFFFFFF0)  # magic 0x184D2A5? little-endian, then a 4-byte length
_IsalError = cast("type[Exception]", isal_zlib.error)  # the stub declares an instance


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writer(Protocol):
    def write(self, data: Any, /) -> int | None: ...


# Layer media types, OCI and Docker schema 2. "+encrypted" layers need ocicrypt: not supported.
MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


def compression_for_media_type(media_type: str) -> Compression | None:
    """The compression a layer media type names; None for a type that does not say (detect it
    from the bytes). Raises NotImplementedErr for encrypted layers."""
    if media_type in MEDIA_TYPES:
        return MEDIA_TYPES[media_type]
    if "+encrypted" in media_type:
        raise NotImplementedErr(f"encrypted layer media type {media_type}")
    if media_type.endswith(("+gzip", ".gzip")):
        return Compression.GZIP
    if media_type.endswith("+zstd"):
        return Compression.ZSTD
    return None


def media_type_for(compression: Compression, *, docker: bool = False) -> str:
    """The layer media type to record for a layer written with ``compression``."""
    if docker:
        if compression is Compression.ZSTD:
            raise InvalidArgument("Docker schema 2 has no zstd layer media type")
        suffix = ".gzip" if compression is Compression.GZIP else ""
        return "application/vnd.docker.image.rootfs.diff.tar" + suffix
    suffix = {Compression.NONE: "", Compression.GZIP: "+gzip", Compression.ZSTD: "+zstd"}[compression]
    return "application/vnd.oci.image.layer.v1.tar" + suffix


def detect_compression(head: bytes) -> Compression:
    """The compression of a stream from its first bytes (10 are enough)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    if len(head) >= 8 and int.from_bytes(head[:4], "little") & _ZSTD_SKIPPABLE[1] == _ZSTD_SKIPPABLE[0]:
        return Compression.ZSTD
    return Compression.NONE


class DecompressingReader:
    """A reader of the decompressed bytes of ``source``; ``compression`` says what was detected.

    ``read(n)`` returns at most ``n`` bytes and ``b""`` only at the end of the stream.
    Closing does not close ``source``.
    """

    compression: Compression

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self._read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        return self._read(size) if size else b""

    def _read(self, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> DecompressingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_decompressed(
    source: Reader, compression: Compression | None = None, *, media_type: str | None = None
) -> DecompressingReader:
    """Read ``source`` decompressed. The compression comes from ``compression``, else from
    ``media_type`` if it names one, else from the first bytes of the stream."""
    if compression is None and media_type is not None:
        compression = compression_for_media_type(media_type)
    head = b""
    if compression is None:
        # A short read is not the end of a pipe: keep reading until 10 bytes or EOF.
        while len(head) < 10 and (more := source.read(10 - len(head))):
            head += more
        compression = detect_compression(head)
    if compression is Compression.GZIP:
        return _GzipReader(source, head)
    if compression is Compression.ZSTD:
        return _ZstdReader(source, head)
    return _PlainReader(source, head)


class _PlainReader(DecompressingReader):
    compression = Compression.NONE

    def __init__(self, source: Reader, head: bytes) -> None:
        self._source = source
        self._head = head

    def _read(self, size: int) -> bytes:
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._source.read(size)


class _GzipReader(DecompressingReader):
    """Concatenated gzip members (pigz, appended layers). NUL padding after a member is allowed,
    as gzip(1) allows it; other trailing bytes are an error, as in Go."""

    compression = Compression.GZIP

    def __init__(self, source: Reader, head: bytes) -> None:
        self._source = source
        self._input = head  # compressed bytes not yet handed to the decoder
        self._decoder: Any = None  # None between members
        self._eof = False

    def _read(self, size: int) -> bytes:
        while not self._eof:
            if self._decoder is None:
                if not self._start_member():
                    break
            d = self._decoder
            if d.unconsumed_tail:
                data = d.unconsumed_tail
            else:
                data = self._input or self._source.read(CHUNK)
                self._input = b""
                if not data:
                    raise DataLoss("gzip stream ends inside a member")
            try:
                out = d.decompress(data, size)
            except _IsalError as e:
                raise InvalidArgument(f"gzip stream: {e}") from None
            if d.eof:
                self._input = d.unused_data
                self._decoder = None
            if out:
                return bytes(out)
        self._eof = True
        return b""

    def _start_member(self) -> bool:
        """Start the next member; False at the clean end of the stream."""
        while True:
            data = self._input.lstrip(b"\x00")
            if len(data) >= len(GZIP_MAGIC):
                break
            more = self._source.read(CHUNK)
            if not more:
                if data:
                    raise InvalidArgument("trailing bytes after gzip stream")
                return False
            self._input = data + more
        if not data.startswith(GZIP_MAGIC):
            raise InvalidArgument("trailing bytes after gzip stream")
        self._input = data
        self._decoder = isal_zlib.decompressobj(31)
        return True


class _ZstdReader(DecompressingReader):
    """Concatenated zstd frames, skippable frames included.

    zstandard's ``stream_reader`` decodes with bounded output per read, but reports a stream cut
    inside a frame as a clean EOF; a :class:`_ZstdFrames` walker follows the frame and block
    headers of the compressed bytes as they pass, and says whether the end is a frame boundary.
    """

    compression = Compression.ZSTD

    def __init__(self, source: Reader, head: bytes) -> None:
        self._frames = _ZstdFrames(source, head)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", self._frames),  # it only calls read()
            read_size=CHUNK,
            read_across_frames=True,
            closefd=False,
        )

    def _read(self, size: int) -> bytes:
        try:
            out = self._reader.read(size)
        except zstandard.ZstdError as e:
            raise InvalidArgument(f"zstd stream: {e}") from None
        if not out and not self._frames.at_boundary():
            raise DataLoss("zstd stream ends inside a frame")
        return out


class _ZstdFrames:
    """A pass-through reader that tracks zstd frame boundaries without decoding (RFC 8878 §3.1).

    Frame: magic ``28 b5 2f fd``, a descriptor byte whose flags size the rest of the header
    (window byte, dictionary id 0/1/2/4, content size 0/1/2/4/8), then blocks, each a 3-byte
    little-endian header (bit 0 last, bits 1-2 type: raw/RLE/compressed, bits 3-23 size; an RLE
    block carries one byte), then a 4-byte checksum if the descriptor says so. Skippable frame:
    magic ``5? 2a 4d 18``, a 4-byte length, that many bytes.
    """

    def __init__(self, source: Reader, head: bytes) -> None:
        self._source = source
        self._head = head
        self._state = "magic"
        self._need = 4  # header bytes to collect for the current state
        self._buf = bytearray()
        self._skip = 0  # payload bytes to pass over before the next header
        self._checksum = False

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = self._source.read(size)
        self._feed(data)
        return data

    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip

    def _feed(self, data: bytes) -> None:
        view, i, n = memoryview(data), 0, len(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += view[i : i + k]
            i += k
            if len(self._buf) == self._need:
                header = bytes(self._buf)
                self._buf.clear()
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        value = int.from_bytes(header, "little")
        if self._state == "magic":
            if header == ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif value & _ZSTD_SKIPPABLE[1] == _ZSTD_SKIPPABLE[0]:
                self._state, self._need = "skippable", 4
            else:
                raise InvalidArgument("zstd stream: bytes after the last frame are not a frame")
        elif self._state == "skippable":
            self._skip, self._state, self._need = value, "magic", 4
        elif self._state == "descriptor":
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3]
            rest += ((1 if single_segment else 0), 2, 4, 8)[value >> 6]
            self._state, self._need = ("header", rest) if rest else ("block", 3)
        elif self._state == "header":
            self._state, self._need = "block", 3
        elif self._state == "block":
            block_type, size = (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise InvalidArgument("zstd stream: reserved block type")
            self._skip = 1 if block_type == 1 else size
            if not value & 1:
                self._need = 3
            elif self._checksum:
                self._state, self._need = "checksum", 4
            else:
                self._state, self._need = "magic", 4
        else:  # checksum
            self._state, self._need = "magic", 4


class Compressor:
    """A writer that compresses into ``out``. ``close()`` writes the trailer and leaves ``out``
    open. gzip comes from isal (levels 0-3; the header has mtime 0, so the same tar always gives
    the same blob), zstd from zstandard (default level 3)."""

    def __init__(self, out: Writer, compression: Compression, level: int | None = None) -> None:
        self.compression = compression
        self._out = out
        self._closed = False
        self._encoder: Any
        if compression is Compression.GZIP:
            lvl = isal_zlib.ISAL_DEFAULT_COMPRESSION if level is None else level
            self._encoder = isal_zlib.compressobj(lvl, isal_zlib.DEFLATED, 31)
        elif compression is Compression.ZSTD:
            self._encoder = zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()
        else:
            self._encoder = None

    def write(self, data: Any, /) -> int:
        n = len(data)
        if self._encoder is None:
            self._out.write(data)
        elif out := self._encoder.compress(data):
            self._out.write(out)
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._encoder is not None and (tail := self._encoder.flush()):
            self._out.write(tail)

    def __enter__(self) -> Compressor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DigestingReader:
    """Passes reads through, counting and hashing them (the diff_id of a layer being applied)."""

    def __init__(self, source: Reader, algorithm: str = "sha256") -> None:
        self._source = source
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: the digest covers the whole stream, padding after the tar included."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"


class DigestingWriter:
    """Passes writes through, counting and hashing them."""

    def __init__(self, out: Writer, algorithm: str = "sha256") -> None:
        self._out = out
        self._algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def write(self, data: Any, /) -> int:
        self._hash.update(data)
        self._out.write(data)
        n = len(data)
        self.size += n
        return n

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"
