"""A stdlib reader of R's lazy-load databases (``Rdata.rdb`` + ``Rdata.rdx``).

Enough of R's XDR serialization format to read the character vectors of a data package and their
names, without R: records are a 4-byte big-endian length + a compressed stream; the ``.rdx`` index
is a (compressed) serialized list naming each object's (offset, length) in the ``.rdb``.
"""

import bz2
import gzip
import logging
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_NA_INT = -(2**31)
_LISTSXP, _CHARSXP, _STRSXP, _VECSXP = 2, 9, 16, 19
_R_CONSTANTS = {
    254: None,  # NILVALUE_SXP
    253: "<globalenv>",
    252: "<unbound>",
    251: "<missing-arg>",
    250: "<base-namespace>",
    242: "<emptyenv>",
    241: "<baseenv>",
}


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name)."""

    name: str


@dataclass
class RObject:
    """An R vector or pairlist: its type code, its elements and its attributes.

    A pairlist's elements are `(tag, value)` pairs (tag `None` when absent)."""

    type: int
    value: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)


class _RReader:
    """Reads one R serialization stream (`serialize()` / `saveRDS()` in XDR format)."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[Any] = []
        if data[:2] != b"X\n":
            raise ValueError(f"{where}: not an R XDR serialization (starts with {data[:2]!r})")
        self.pos = 2
        version = self.int32()
        self.int32(), self.int32()  # writer's R version, oldest R version that can read it
        if version not in (2, 3):
            raise ValueError(f"{where}: R serialization version {version}; 2 and 3 are supported")
        self.native = self.take(self.int32()).decode("ascii") if version == 3 else "latin-1"

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.where}: truncated R data (wanted {n} bytes at {self.pos})")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int32()
        return n if n != -1 else (self.int32() << 32) + self.int32()

    def item(self) -> Any:
        flags = self.int32()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr = bool(flags & (1 << 9))
        if kind in _R_CONSTANTS:
            return _R_CONSTANTS[kind]
        if kind == 255:  # REFSXP: 1-based index packed in the flags, or in the next int
            index = (flags >> 8) or self.int32()
            if not 0 < index <= len(self.refs):
                raise ValueError(f"{self.where}: reference {index} to an unread object")
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: a CHARSXP, remembered for later REFSXPs
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if kind == _LISTSXP:
            return self.pairlist(flags)
        if kind == _CHARSXP:
            return self.charsxp(levels)
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            value: list[Any] = [
                None if i == _NA_INT else (bool(i) if kind == 10 else i) for i in ints
            ]
        elif kind == 14:  # REALSXP
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == 24:  # RAWSXP
            value = list(self.take(self.length()))
        elif kind in (_STRSXP, _VECSXP, 20):  # STRSXP, VECSXP, EXPRSXP
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"{self.where}: unsupported R type code {kind} at byte {self.pos - 4}")
        return RObject(kind, value, self.attributes() if has_attr else {})

    def charsxp(self, levels: int) -> str | None:
        n = self.int32()
        if n == -1:
            return None
        raw = self.take(n)
        if levels & 8:  # UTF8_MASK
            return raw.decode("utf-8")
        if levels & (4 | 2):  # LATIN1_MASK, BYTES_MASK
            return raw.decode("latin-1")
        return raw.decode(self.native, errors="replace")

    def pairlist(self, flags: int) -> RObject:
        # Read iteratively: a long pairlist would otherwise recurse once per element.
        out = RObject(_LISTSXP, [])
        while flags & 0xFF == _LISTSXP:
            attrs = self.attributes() if flags & (1 << 9) else {}
            tag = self.item() if flags & (1 << 10) else None
            out.value.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
            out.attributes.update(attrs)
            flags = self.int32()
        if flags & 0xFF != 254:
            raise ValueError(f"{self.where}: pairlist ends in R type {flags & 0xFF}, not NULL")
        return out

    def attributes(self) -> dict[str, Any]:
        attrs = self.item()
        if not isinstance(attrs, RObject) or attrs.type != _LISTSXP:
            raise ValueError(f"{self.where}: attributes are not a pairlist")
        return {str(tag): value for tag, value in attrs.value}


def unserialize_r(data: bytes, where: str = "<bytes>") -> Any:
    """Decode one R XDR serialization (an uncompressed `.rds` stream) into Python values:
    `RObject`, `RSymbol`, `str` (CHARSXP) or `None` (NULL)."""
    return _RReader(data, where).item()


def _decompress_file(raw: bytes) -> bytes:
    """`saveRDS` output: gzip, bzip2, xz or uncompressed."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return zlib.decompress(raw) if raw[:1] == b"\x78" else raw


def _decompress_record(blob: bytes, method: Any, where: str) -> bytes:
    """One lazy-load record. Uncompressed (`compressed=FALSE`) it is the bare serialization;
    otherwise a big-endian uncompressed length, a type byte (bzip2/xz databases only), the data."""
    if method in (False, 0):
        return blob
    if len(blob) < 5:
        raise ValueError(f"{where}: record of {len(blob)} bytes is too short")
    size = struct.unpack(">I", blob[:4])[0]
    codecs = {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress}
    try:
        if method in (True, 1):
            data = zlib.decompress(blob[4:])
        else:
            data = codecs.get(blob[4:5], bytes)(blob[5:])
    except (zlib.error, lzma.LZMAError, OSError) as err:
        raise ValueError(f"{where}: corrupted compressed record ({err})") from None
    if len(data) != size:
        raise ValueError(f"{where}: record holds {len(data)} bytes, its header says {size}")
    return data


def _names(obj: Any, where: str) -> list[str]:
    names = obj.attributes.get("names") if isinstance(obj, RObject) else None
    if not isinstance(names, RObject) or len(names.value) != len(obj.value):
        raise ValueError(f"{where}: expected a named R list")
    return names.value


def read_rdata(path: PathLike) -> dict[str, list[str | None]]:
    """Read the character vectors of an R lazy-load database (`Rdata.rdb`).

    The object names and record positions come from the companion index `Rdata.rdx`. NA elements
    are `None`. Objects that are not character vectors are left out (logged)."""
    rdb = Path(path)
    rdx = rdb.with_suffix(".rdx")
    for needed in (rdb, rdx):
        if not needed.is_file():
            raise ValueError(f"R lazy-load database file not found: {needed}")
    try:
        index = unserialize_r(_decompress_file(rdx.read_bytes()), str(rdx))
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise ValueError(f"{rdx}: corrupted compressed index ({err})") from None
    parts = dict(zip(_names(index, str(rdx)), index.value, strict=True))
    if "variables" not in parts:
        raise ValueError(f"{rdx}: index has no 'variables' entry (has {sorted(parts)})")
    method = parts.get("compressed", RObject(10, [True])).value[0]
    variables = parts["variables"]
    blob = rdb.read_bytes()
    out: dict[str, list[str | None]] = {}
    for name, pos in zip(_names(variables, str(rdx)), variables.value, strict=True):
        where = f"{rdb} (object {name!r})"
        if not isinstance(pos, RObject) or len(pos.value) != 2:
            raise ValueError(f"{where}: the index gives no (offset, length) pair")
        offset, length = pos.value
        if offset + length > len(blob):
            raise ValueError(
                f"{where}: needs bytes {offset}..{offset + length}, file has {len(blob)}"
            )
        obj = unserialize_r(
            _decompress_record(blob[offset : offset + length], method, where), where
        )
        if isinstance(obj, RObject) and obj.type == _STRSXP:
            out[name] = obj.value
        else:
            log.warning("%s is not a character vector; skipped", where)
    return out


# --- corpora ---------------------------------------------------------------------------------
