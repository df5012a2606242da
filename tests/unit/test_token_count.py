"""spendwarden.tokencount: the proxy's default counter must count exactly as tiktoken does."""
import os
import random
import stat

import pytest

from spendwarden import tokencount as tc
from spendwarden.routing import tokens as tok


@pytest.fixture(scope="module")
def tiktoken_enc():
    tok.seed_tiktoken_cache("cl100k_base")
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def _texts() -> list[str]:
    rng = random.Random(12)
    here = os.path.dirname(__file__)
    texts = [open(os.path.join(here, name), encoding="utf-8").read() for name in sorted(os.listdir(here))
             if name.endswith(".py")][:8]
    alphabet = "".join(chr(c) for c in [*range(32, 127), *range(0xA0, 0x3000, 7), 0x1F600, 0x1F4A9, 0x4E2D,
                                        0x6587, 0x0301, 0x017F, 10, 13, 9, 0x2028, 0x3000])
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(300)]
    texts += [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 30)))
                       for _ in range(40)) for _ in range(50)]
    texts += ["", " ", "\n\n", "I'll've  it's  DON'T", "1234567 3.14159", "naïve café 東京 🎉🎉", "\t \n x  \n"]
    return texts


def test_counts_and_ids_equal_tiktokens(tiktoken_enc):
    counter = tc.get_counter()
    for text in _texts():
        ids = tiktoken_enc.encode_ordinary(text)
        assert counter.encode_ordinary(text) == ids, text[:80]
        assert counter.count(text) == len(ids), text[:80]


def test_a_long_unknown_piece_is_counted_as_an_upper_bound(tiktoken_enc):
    counter = tc.get_counter()
    word = "".join(random.Random(3).choice("qxzjkv") for _ in range(tc.LONG_PIECE + 50))
    exact = len(tiktoken_enc.encode_ordinary(word))
    assert counter.count(word) == len(word.encode()) >= exact  # never below: reservations stay bounds
    assert counter.encode_ordinary(word) == tiktoken_enc.encode_ordinary(word)


def test_caches_stay_bounded():
    counter = tc.get_counter()
    rng = random.Random(5)
    for _ in range(3):
        counter.count(" ".join(f"w{rng.random()}" for _ in range(tc.PIECE_CACHE)))
        counter.count("".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(30_000)))
    assert len(counter._cache) <= tc.PIECE_CACHE
    assert len(counter._pretokenize._TBL) <= tc.CODE_TABLE_MAX + 30_000


def test_table_file_is_built_readable_checked_and_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "t.swbpe"
    monkeypatch.setenv("SPENDWARDEN_TOKEN_TABLE", str(path))
    counter = tc.Counter(tc._open_table(tc.ENCODING))
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o644  # the image builds it as root
    assert counter.count("hello world") == 2 and counter.n_vocab == 100256
    path.write_bytes(path.read_bytes()[:-1])  # truncated: not trusted, rebuilt
    assert tc.Counter(tc._open_table(tc.ENCODING)).count("hello world") == 2
    assert tc._valid(path.read_bytes(), tc.ENCODING)


def test_an_unwritable_table_path_builds_the_table_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPENDWARDEN_TOKEN_TABLE", str(blocker / "t.swbpe"))  # a directory that cannot exist
    buf = tc._open_table(tc.ENCODING)
    assert isinstance(buf, bytes) and tc.Counter(buf).count("hello world") == 2


def test_the_proxy_uses_it_by_default_and_tiktoken_on_request(monkeypatch):
    monkeypatch.setattr(tok, "_encoder", None)
    monkeypatch.delenv("SPENDWARDEN_TOKENIZER", raising=False)
    assert isinstance(tok.load_encoder(), tc.Counter)
    monkeypatch.setattr(tok, "_encoder", None)
    monkeypatch.setenv("SPENDWARDEN_TOKENIZER", "tiktoken")
    enc = tok.load_encoder()
    assert not isinstance(enc, tc.Counter) and enc.count("hello world") == 2
