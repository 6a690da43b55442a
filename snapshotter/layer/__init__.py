"""OCI layers: apply a layer tar to a snapshot, and compute one from a snapshot.

    plan         pure: one tar member -> Write | Whiteout | Opaque | Skip | Reject
    apply        the executor: a streaming tar loop confined to the root, two whiteout strategies
    diff         a layer tar from an overlay upper dir, or from two full trees
    compression  gzip (isal) / zstd / none: detect, decompress, compress; digesting streams

Everything here blocks; the daemon calls it through a worker thread.
"""

from pyctr.snapshotter.layer.apply import ApplyResult, apply_layer
from pyctr.snapshotter.layer.compression import (
    Compression,
    Compressor,
    DecompressingReader,
    DigestingReader,
    DigestingWriter,
    compression_for_media_type,
    detect_compression,
    media_type_for,
    open_decompressed,
)
from pyctr.snapshotter.layer.diff import DiffResult, write_diff, write_overlay_diff

__all__ = [
    "ApplyResult",
    "Compression",
    "Compressor",
    "DecompressingReader",
    "DiffResult",
    "DigestingReader",
    "DigestingWriter",
    "apply_layer",
    "compression_for_media_type",
    "detect_compression",
    "media_type_for",
    "open_decompressed",
    "write_diff",
    "write_overlay_diff",
]
