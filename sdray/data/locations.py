"""Where a sample's image bytes sit inside its corpus shard, recorded at index time.

The image route (``serve/images.py``) returns a thumbnail of one indexed image; with a location it
reads only that image's bytes instead of its whole corpus shard. A location is one short string
(the ``image_loc`` column of an index shard's ``meta.parquet``):

* ``bytes=<offset>+<size>`` — a WebDataset tar member's data: ``size`` bytes from byte ``offset``
  (uncompressed tars only; the 512-byte member header ends at ``offset``);
* ``row=<row group>:<row>`` — a Parquet shard's row ``row`` of row group ``row group`` (both from 0).

``None`` (an index built before locations were recorded, or a corpus whose offsets mean nothing,
such as a compressed tar) leaves the reader to find the sample by its key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BYTES = re.compile(r"bytes=(\d{1,19})\+(\d{1,19})")
_ROW = re.compile(r"row=(\d{1,9}):(\d{1,19})")


@dataclass(frozen=True)
class TarMember:
    """The data of one tar member: ``size`` bytes starting at byte ``offset`` of the tar."""

    offset: int
    size: int

    def __str__(self) -> str:
        return f"bytes={self.offset}+{self.size}"


@dataclass(frozen=True)
class ParquetRow:
    """Row ``row`` (from 0) of row group ``row_group`` of a Parquet file."""

    row_group: int
    row: int

    def __str__(self) -> str:
        return f"row={self.row_group}:{self.row}"


def parse_location(text: str | None) -> TarMember | ParquetRow | None:
    """The location ``text`` names; ``None`` for none. ``ValueError`` if it is malformed."""
    if text is None or text == "":
        return None
    if m := _BYTES.fullmatch(text):
        return TarMember(int(m[1]), int(m[2]))
    if m := _ROW.fullmatch(text):
        return ParquetRow(int(m[1]), int(m[2]))
    raise ValueError(f"not an image location: {text[:60]!r}")
