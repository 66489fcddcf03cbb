"""HPACK (RFC 7541): header compression for HTTP/2, sans I/O.

:class:`Encoder` turns a header list into a field block; :class:`Decoder` turns a field block back
into a header list. Each keeps the dynamic table of its direction of one connection. Names and values
are bytes throughout. Errors in a peer's field block raise :class:`HPACKError` (the connection must
then end with COMPRESSION_ERROR); a block whose decoded size passes ``max_header_list_size`` raises
:class:`HeaderListTooLarge` after the whole block has been decoded, so the table stays in sync.

Huffman coding uses the canonical code of RFC 7541 Appendix B, stored as code lengths (the code of
each symbol follows from the lengths); decoding walks a 16-way table four bits at a time.
"""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]

DEFAULT_TABLE_SIZE: Final = 4096
ENTRY_OVERHEAD: Final = 32  # RFC 7541 section 4.1


class HPACKError(Exception):
    """A field block that cannot be decoded (COMPRESSION_ERROR)."""


class HeaderListTooLarge(HPACKError):
    """The decoded header list is larger than the limit (the block itself was valid)."""


# RFC 7541 Appendix A.
STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
STATIC_LEN: Final = len(STATIC_TABLE)

# Code length in bits of each symbol 0..256 (256 is EOS), RFC 7541 Appendix B. The code is
# canonical: codes are handed out in order of (length, symbol), each one more than the last,
# shifted left when the length grows.
HUFFMAN_LENGTHS: Final[tuple[int, ...]] = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
)  # fmt: skip

EOS: Final = 256


def _canonical_codes(lengths: tuple[int, ...]) -> list[int]:
    codes = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    code = 0
    prev = lengths[order[0]]
    for i, sym in enumerate(order):
        if i:
            code = (code + 1) << (lengths[sym] - prev)
            prev = lengths[sym]
        codes[sym] = code
    return codes


HUFFMAN_CODES: Final[list[int]] = _canonical_codes(HUFFMAN_LENGTHS)

# Decoding table: state s (an inner node of the code tree, 0 = root) and 4 input bits give
# _DEC_NEXT[s*16+nibble] = next state, or -1 for an error (EOS decoded); _DEC_SYM = the symbol
# completed on the way (at most one: no code is shorter than 5 bits), or -1.
# _DEC_ACCEPT[s]: input may end in state s (the bits since the last symbol are a prefix of EOS,
# i.e. all ones, and fewer than 8).


def _build_decoder() -> tuple[list[int], list[int], list[bool]]:
    # Build the tree: children[node] = [left, right]; a child >= 0 is an inner node, < 0 is
    # -(symbol+1).
    children: list[list[int]] = [[0, 0]]
    unset = 1 << 30
    children[0] = [unset, unset]
    for sym in range(257):
        code, length = HUFFMAN_CODES[sym], HUFFMAN_LENGTHS[sym]
        node = 0
        for i in range(length - 1, -1, -1):
            bit = (code >> i) & 1
            if i == 0:
                children[node][bit] = -(sym + 1)
            else:
                nxt = children[node][bit]
                if nxt == unset:
                    children.append([unset, unset])
                    nxt = len(children) - 1
                    children[node][bit] = nxt
                node = nxt
    n = len(children)
    # Depth and all-ones-ness of each inner node.
    depth = [0] * n
    ones = [False] * n
    ones[0] = True
    stack = [0]
    while stack:
        node = stack.pop()
        for bit in (0, 1):
            c = children[node][bit]
            if c >= 0:
                depth[c] = depth[node] + 1
                ones[c] = ones[node] and bit == 1
                stack.append(c)
    accept = [ones[s] and depth[s] < 8 for s in range(n)]
    nxt_tab = [0] * (n * 16)
    sym_tab = [-1] * (n * 16)
    for s in range(n):
        for nib in range(16):
            node = s
            sym = -1
            ok = True
            for i in (3, 2, 1, 0):
                c = children[node][(nib >> i) & 1]
                if c < 0:
                    if -c - 1 == EOS:
                        ok = False
                        break
                    sym = -c - 1
                    node = 0
                else:
                    node = c
            nxt_tab[s * 16 + nib] = node if ok else -1
            sym_tab[s * 16 + nib] = sym
    return nxt_tab, sym_tab, accept


_DEC_NEXT, _DEC_SYM, _DEC_ACCEPT = _build_decoder()


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string (RFC 7541 section 5.2)."""
    nxt = _DEC_NEXT
    syms = _DEC_SYM
    out = bytearray()
    state = 0
    for b in data:
        i = state * 16 + (b >> 4)
        state = nxt[i]
        if state < 0:
            raise HPACKError("Huffman string contains EOS")
        sym = syms[i]
        if sym >= 0:
            out.append(sym)
        i = state * 16 + (b & 15)
        state = nxt[i]
        if state < 0:
            raise HPACKError("Huffman string contains EOS")
        sym = syms[i]
        if sym >= 0:
            out.append(sym)
    if not _DEC_ACCEPT[state]:
        raise HPACKError("Huffman string has invalid padding")
    return bytes(out)


def huffman_length(data: bytes) -> int:
    """The length in bytes of ``data`` Huffman-coded."""
    lengths = HUFFMAN_LENGTHS
    bits = 0
    for b in data:
        bits += lengths[b]
    return (bits + 7) >> 3


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code ``data``, padded with the most significant bits of EOS (all ones)."""
    codes = HUFFMAN_CODES
    lengths = HUFFMAN_LENGTHS
    out = bytearray()
    acc = 0
    nbits = 0
    for b in data:
        acc = (acc << lengths[b]) | codes[b]
        nbits += lengths[b]
        while nbits >= 8:
            nbits -= 8
            out.append((acc >> nbits) & 0xFF)
        acc &= (1 << nbits) - 1
    if nbits:
        out.append(((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF)
    return bytes(out)


def _same_fields(a: Headers, b: Headers) -> bool:
    """``a == b`` for two header lists, as a compiled loop of byte comparisons (a list's ``==`` is
    a generic rich comparison per tuple and per element: ~3x the instructions)."""
    n = len(a)
    if n != len(b):
        return False
    for i in range(n):
        name_a, value_a = a[i]
        name_b, value_b = b[i]
        if name_a != name_b or value_a != value_b:
            return False
    return True


def encode_integer(value: int, prefix_bits: int, first: int, out: bytearray) -> None:
    """Append ``value`` with an N-bit prefix (RFC 7541 section 5.1); ``first`` holds the flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(first | value)
        return
    out.append(first | limit)
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


# Integers in a field block are bounded: nothing legitimate needs more than 2**32.
_MAX_INT: Final = 1 << 32


def _decode_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    n = len(data)
    while True:
        if pos >= n:
            raise HPACKError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if value >= _MAX_INT:
            raise HPACKError("integer too large")
        if not b & 0x80:
            return value, pos
        shift += 7


def _entry_size(name: bytes, value: bytes) -> int:
    return len(name) + len(value) + ENTRY_OVERHEAD


class Decoder:
    """Decodes field blocks of one direction of a connection.

    ``max_allowed_table_size`` is what we advertised as SETTINGS_HEADER_TABLE_SIZE: the peer's
    encoder may size the table up to it with size updates. ``max_header_list_size`` bounds the
    decoded list (RFC 9113 section 6.5.2 counting: name + value + 32 per field).
    """

    __slots__ = ("_entries", "_size", "_table_max", "max_allowed_table_size", "max_header_list_size", "version")

    def __init__(self, max_header_list_size: int = 65536, max_allowed_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._entries: list[tuple[bytes, bytes]] = []  # oldest first
        self._size = 0
        # Changes whenever the dynamic table may have: a block decoded at one version decodes to
        # the same fields at the same version (the connection caches decoded blocks by it).
        self.version = 0
        self._table_max = max_allowed_table_size
        self.max_allowed_table_size = max_allowed_table_size
        self.max_header_list_size = max_header_list_size

    @property
    def table_size(self) -> int:
        return self._size

    def _add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        size = _entry_size(name, value)
        entries = self._entries
        if size > self._table_max:
            entries.clear()
            self._size = 0
            return
        self._size += size
        while self._size > self._table_max:
            old = entries.pop(0)
            self._size -= _entry_size(old[0], old[1])
        entries.append((name, value))

    def _resize(self, new_max: int) -> None:
        if new_max > self.max_allowed_table_size:
            raise HPACKError(f"dynamic table size update to {new_max} above the limit {self.max_allowed_table_size}")
        self.version += 1
        self._table_max = new_max
        entries = self._entries
        while self._size > new_max:
            old = entries.pop(0)
            self._size -= _entry_size(old[0], old[1])

    def _lookup(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise HPACKError("header index 0")
        if index <= STATIC_LEN:
            return STATIC_TABLE[index - 1]
        d = index - STATIC_LEN
        entries = self._entries
        if d > len(entries):
            raise HPACKError(f"header index {index} out of range")
        return entries[len(entries) - d]

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HPACKError("truncated string")
        huff = data[pos] & 0x80
        length, pos = _decode_integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HPACKError("string longer than the field block")
        raw = data[pos:end]
        if huff:
            return huffman_decode(raw), end
        return raw, end

    def decode(self, data: bytes) -> Headers:
        """Decode one complete field block."""
        out: Headers = []
        pos = 0
        n = len(data)
        total = 0
        limit = self.max_header_list_size
        too_large = False
        seen_field = False
        while pos < n:
            b = data[pos]
            if b & 0x80:  # indexed field
                index, pos = _decode_integer(data, pos, 7)
                name, value = self._lookup(index)
            elif b & 0xC0 == 0x40:  # literal with incremental indexing
                index, pos = _decode_integer(data, pos, 6)
                if index:
                    name = self._lookup(index)[0]
                else:
                    name, pos = self._string(data, pos)
                value, pos = self._string(data, pos)
                self._add(name, value)
            elif b & 0xE0 == 0x20:  # dynamic table size update
                if seen_field:
                    raise HPACKError("dynamic table size update after a field")
                size, pos = _decode_integer(data, pos, 5)
                self._resize(size)
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                index, pos = _decode_integer(data, pos, 4)
                if index:
                    name = self._lookup(index)[0]
                else:
                    name, pos = self._string(data, pos)
                value, pos = self._string(data, pos)
            seen_field = True
            total += len(name) + len(value) + ENTRY_OVERHEAD
            if total > limit:
                too_large = True
            if not too_large:
                out.append((name, value))
        if too_large:
            raise HeaderListTooLarge(f"header list larger than {limit} bytes")
        return out


# Fields never added to the table and marked never-indexed (RFC 7541 section 7.1.3).
_SENSITIVE: Final = frozenset({b"authorization", b"proxy-authorization"})


def _static_maps() -> tuple[dict[tuple[bytes, bytes], int], dict[bytes, int]]:
    full: dict[tuple[bytes, bytes], int] = {}
    names: dict[bytes, int] = {}
    for i, (name, value) in enumerate(STATIC_TABLE):
        full.setdefault((name, value), i + 1)
        names.setdefault(name, i + 1)
    return full, names


_STATIC_MAPS: Final = _static_maps()
_STATIC_FULL: Final = _STATIC_MAPS[0]
_STATIC_NAME: Final = _STATIC_MAPS[1]
# An encoder's field map starts with the static table's fields, each as minus its index.
_STATIC_FULL_NEGATIVE: Final = {field: -index for field, index in _STATIC_FULL.items()}
_MISSING: Final = 1 << 40  # no field index is ever this large
# Every single-byte string, so a small integer's encoding is a lookup.
_BYTES: Final = tuple(bytes((i,)) for i in range(256))


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """``value`` with an N-bit prefix (RFC 7541 section 5.1) as bytes; ``first`` holds the flag bits."""
    if value < (1 << prefix_bits) - 1:
        return _BYTES[first | value]
    out = bytearray()
    encode_integer(value, prefix_bits, first, out)
    return bytes(out)


# Field blocks an encoder remembers (see Encoder.encode): a response head and its trailers, a
# request head or two: a connection's few recurring header lists.
ENCODED_REMEMBERED: Final = 4


class _Encoded:
    """A header list and the field block it encoded to, at an encoder table ``version``."""

    __slots__ = ("block", "headers", "huffman", "version")

    def __init__(self, headers: Headers, block: bytes, version: int, huffman: bool) -> None:
        self.headers = headers
        self.block = block
        self.version = version
        self.huffman = huffman


class Encoder:
    """Encodes header lists for one direction of a connection, with a dynamic table."""

    __slots__ = (
        "_entries",
        "_full",
        "_inserted",
        "_names",
        "_pending_min",
        "_pending_update",
        "_recent",
        "_recent_next",
        "_size",
        "_table_max",
        "_version",
        "huffman",
    )

    def __init__(self, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._entries: list[tuple[bytes, bytes]] = []  # oldest first
        self._size = 0
        self._table_max = table_size
        self._inserted = 0  # insertion number of the next entry
        # (name, value) -> insertion number; the static table's fields as minus their index.
        self._full: dict[tuple[bytes, bytes], int] = dict(_STATIC_FULL_NEGATIVE)
        self._names: dict[bytes, int] = {}  # name -> insertion number
        self._pending_update = False
        self._pending_min = table_size
        self.huffman = True
        # Changes with every change of the dynamic table (insertion, eviction, resize).
        self._version = 0
        self._recent: list[_Encoded] = []
        self._recent_next = 0

    @property
    def table_size(self) -> int:
        return self._table_max

    @table_size.setter
    def table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE changed: signal it in the next block."""
        if value == self._table_max and not self._pending_update:
            return
        self._pending_update = True
        self._pending_min = min(self._pending_min, value)
        self._table_max = value
        self._version += 1
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while self._size > self._table_max and entries:
            name, value = entries.pop(0)
            self._size -= _entry_size(name, value)
            first = self._inserted - len(entries) - 1
            if self._full.get((name, value)) == first:
                del self._full[(name, value)]
            if self._names.get(name) == first:
                del self._names[name]

    def _add(self, name: bytes, value: bytes) -> None:
        self._version += 1
        size = _entry_size(name, value)
        if size > self._table_max:
            self._entries.clear()
            self._full.clear()
            self._full.update(_STATIC_FULL_NEGATIVE)
            self._names.clear()
            self._size = 0
            return
        self._size += size
        self._evict()
        self._entries.append((name, value))
        n = self._inserted
        self._inserted = n + 1
        self._full[(name, value)] = n
        self._names[name] = n

    def _string(self, s: bytes, out: list[bytes]) -> None:
        if self.huffman and len(s) > 1:
            hl = huffman_length(s)
            if hl <= len(s):
                out.append(_int(hl, 7, 0x80))
                out.append(huffman_encode(s))
                return
        out.append(_int(len(s), 7, 0))
        out.append(s)

    def encode(self, headers: Headers) -> bytes:
        """Encode one header list into a field block."""
        # The same header list encoded at the same table state gives the same block, so a list
        # whose encoding changed nothing in the table (every field found in it, or sent without
        # indexing) is remembered with the block: a connection's recurring heads (a gRPC call's
        # request, response and trailers) are then encoded by one list comparison.
        version = self._version
        huffman = self.huffman
        pending = self._pending_update  # the block then starts with a size update: sent once
        if not pending:
            for seen in self._recent:
                if seen.version == version and seen.huffman == huffman and _same_fields(seen.headers, headers):
                    return seen.block
        block = self._encode(headers)
        if self._version == version and not pending:
            seen = _Encoded(list(headers), block, version, huffman)  # a copy: the caller may reuse its list
            if len(self._recent) < ENCODED_REMEMBERED:
                self._recent.append(seen)
            else:
                self._recent[self._recent_next] = seen
                self._recent_next = (self._recent_next + 1) % ENCODED_REMEMBERED
        return block

    def _encode(self, headers: Headers) -> bytes:
        # Pieces joined once at the end (appending to a bytearray is a method call per byte).
        out: list[bytes] = []
        if self._pending_update:
            if self._pending_min < self._table_max:
                out.append(_int(self._pending_min, 5, 0x20))
            out.append(_int(self._table_max, 5, 0x20))
            self._pending_update = False
            self._pending_min = self._table_max
        full = self._full
        names = self._names
        for name, value in headers:
            # One lookup for both tables: static entries are in ``full`` as minus their index.
            ins = full.get((name, value), _MISSING)
            if ins != _MISSING:
                out.append(_int(-ins if ins < 0 else STATIC_LEN + self._inserted - ins, 7, 0x80))
                continue
            name_idx = _STATIC_NAME.get(name, 0)
            if not name_idx:
                ins = names.get(name, -1)
                if ins >= 0:
                    name_idx = STATIC_LEN + self._inserted - ins
            if name in _SENSITIVE or (name == b"cookie" and len(value) < 20):
                out.append(_int(name_idx, 4, 0x10))
                if not name_idx:
                    self._string(name, out)
                self._string(value, out)
                continue
            if _entry_size(name, value) * 4 > self._table_max * 3:
                # Too large to be worth a table slot: literal without indexing.
                out.append(_int(name_idx, 4, 0x00))
                if not name_idx:
                    self._string(name, out)
                self._string(value, out)
                continue
            out.append(_int(name_idx, 6, 0x40))
            if not name_idx:
                self._string(name, out)
            self._string(value, out)
            self._add(name, value)
        return b"".join(out)
