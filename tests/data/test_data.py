import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from linearize import paths
from linearize.data import blocks, corpora, rdata
from linearize.data import tokens as token_ids

# --- a tiny writer of R's XDR serialization, enough to build lazy-load databases -------------


def _int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _header(version: int) -> bytes:
    out = b"X\n" + _int(version, 0x040201, 0x030500 if version == 3 else 0x020300)
    return out + (_int(5) + b"UTF-8" if version == 3 else b"")


def _charsxp(text: str | None, encoding: str = "utf-8") -> bytes:
    if text is None:
        return _int(9, -1)
    levels = {"utf-8": 8, "latin-1": 4, "ascii": 64}[encoding]
    raw = text.encode(encoding)
    return _int(9 | levels << 12, len(raw)) + raw


def _strsxp(values: list, has_attr: bool = False) -> bytes:
    items = b"".join(_charsxp(*v) if isinstance(v, tuple) else _charsxp(v) for v in values)
    return _int(16 | (has_attr << 9), len(values)) + items


NAMES_SYMBOL = _int(1) + _charsxp("names", "ascii")
NAMES_REF = _int(255 | 1 << 8)  # the first symbol read, by reference


def _names_attr(names: list[str], first: bool) -> bytes:
    """A pairlist `names = c(...)`: the symbol itself the first time, a REFSXP afterwards."""
    tag = NAMES_SYMBOL if first else NAMES_REF
    return _int(2 | 1 << 10) + tag + _strsxp(names) + _int(254)


def _named_list(items: dict[str, bytes], first: bool) -> bytes:
    body = _int(19 | 1 << 9, len(items)) + b"".join(items.values())
    return body + _names_attr(list(items), first)


def write_rdata(folder: Path, objects: dict[str, bytes], version: int = 3) -> Path:
    """Write `Rdata.rdb` (records in reverse order) and a gzip-compressed `Rdata.rdx`."""
    records, offsets = b"", {}
    for name in reversed(list(objects)):
        payload = _header(version) + objects[name]
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        offsets[name] = (len(records), len(record))
        records += record
    variables = {name: _int(13, 2, *offsets[name]) for name in objects}
    index = _named_list(
        {
            "variables": _named_list(variables, first=True),
            "references": _int(19 | 1 << 9, 0) + _names_attr([], first=False),
            "compressed": _int(10, 1, 1),
        },
        first=False,
    )
    (folder / "Rdata.rdb").write_bytes(records)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_header(version) + index))
    return folder / "Rdata.rdb"


# --- the R reader ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_read_rdata_names_come_from_the_index(tmp_path: Path, version: int) -> None:
    objects = {
        "alpha": _strsxp(["Title", None, ("caf\u00e9", "latin-1"), "\u2014 dash"]),
        "beta": _strsxp(["b1", "b2"], has_attr=True) + _names_attr(["x", "y"], first=True),
        "numbers": _int(13, 3, 1, 2, -(2**31)),
    }
    out = rdata.read_rdata(write_rdata(tmp_path, objects, version))
    assert out == {"alpha": ["Title", None, "caf\u00e9", "\u2014 dash"], "beta": ["b1", "b2"]}


def test_unserialize_r_pairlist_and_refs() -> None:
    stream = _header(3) + _named_list({"a": _int(14, 1) + struct.pack(">d", 2.5)}, first=True)
    obj = rdata.unserialize_r(stream)
    assert obj.type == 19 and obj.value[0].value == [2.5]
    assert obj.attributes["names"].value == ["a"]


def test_read_rdata_errors(tmp_path: Path) -> None:
    rdb = write_rdata(tmp_path, {"alpha": _strsxp(["x"] * 50)})
    rdb.write_bytes(rdb.read_bytes()[:-5])
    with pytest.raises(ValueError, match="'alpha'.*needs bytes"):
        rdata.read_rdata(rdb)
    rdb.write_bytes(rdb.read_bytes()[:10] + b"\x00" * 200)
    with pytest.raises(ValueError, match="'alpha'.*corrupted compressed record"):
        rdata.read_rdata(rdb)
    (tmp_path / "Rdata.rdx").unlink()
    with pytest.raises(ValueError, match=r"not found: .*Rdata\.rdx"):
        rdata.read_rdata(rdb)
    with pytest.raises(ValueError, match="not an R XDR"):
        rdata.unserialize_r(b"A\n1\n")


# --- the real corpora (read from the user cache only: tests never download) -------------------


def _cached_deb(package: str) -> Path:
    root = paths.cache_dir() / "debs" / package
    if not root.is_dir():
        pytest.skip(f"{package} not in {root.parent}; fetch it with linearize.corpora.load_text")
    return root


def test_real_austen() -> None:
    root = _cached_deb("r-cran-janeaustenr")
    novels = rdata.read_rdata(root / corpora.CORPORA["austen"].rdata)
    assert list(novels) == [
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    ]
    assert all(len(lines) > 5000 for lines in novels.values())
    assert novels["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    text = corpora.load_text("austen:eval")
    assert text.startswith("PRIDE AND PREJUDICE\n") and text == corpora.load_text("prideprejudice")
    assert "PRIDE AND PREJUDICE" not in corpora.load_text("austen")


def test_real_mobydick() -> None:
    _cached_deb("r-cran-tokenizers")
    text = corpora.load_text("mobydick")
    assert "\r" not in text and "*** START" not in text and "Gutenberg" not in text[-2000:]
    assert "Call me Ishmael." in text and text.endswith("orphan.")


# --- user text ---------------------------------------------------------------------------------


def test_load_text_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n')
    (tmp_path / "a.md").write_text("\ufefffirst")
    (tmp_path / "skip.csv").write_text("ignored")
    assert corpora.load_text(tmp_path) == "first\n\nsecond\n\nj1\n\nj2"
    assert corpora.load_text(tmp_path / "b.txt") == "second"
    (tmp_path / "d.jsonl").write_text('{"body": "x\u2028y"}\r\n', encoding="utf-8")
    assert corpora.load_text(tmp_path / "d.jsonl", text_field="body") == "x\u2028y"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", b"ok\n\xff\xfe", r"bad\.txt is not UTF-8 text: byte 0xff at offset 3"),
        ("bad.jsonl", b'{"text": "a"}\n{"title": "b"}\n', r"bad\.jsonl, line 2: no string field"),
        ("bad.jsonl", b'{"text": "a"}\n{oops\n', r"line 2: not JSON"),
        ("empty.txt", b"  \n", "holds no text"),
        ("data.csv", b"a,b", "unsupported file type '.csv'"),
    ],
)
def test_load_text_bad_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        corpora.load_text(tmp_path / name)


def test_load_text_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a built-in corpus.*austen:eval.*mobydick"):
        corpora.load_text("shakespeare")
    with pytest.raises(ValueError, match="nor an existing file"):
        corpora.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="holds no .txt/.md/.jsonl files"):
        corpora.load_text(tmp_path)


def test_strip_gutenberg() -> None:
    raw = "\ufeffHeader\r\n*** START OF X ***\r\n\r\nBody 1\r\nBody 2\r\n\r\nEnd of Project "
    raw += "Gutenberg's X\r\n\r\n*** END OF X ***\r\nLicence"
    assert corpora._strip_gutenberg(raw, "x") == "Body 1\nBody 2"
    with pytest.raises(ValueError, match="no '\\*\\*\\* START'"):
        corpora._strip_gutenberg("no markers", "x")


# --- caches and Debian packages ----------------------------------------------------------------


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "linearize"
    assert paths.cache_dir(tmp_path / "own") == tmp_path / "own" and (tmp_path / "own").is_dir()


def test_fetch_deb_reuses_and_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "debs" / "r-cran-fake").mkdir(parents=True)
    monkeypatch.setattr(corpora.shutil, "which", lambda _: None)
    assert corpora.fetch_deb("r-cran-fake", tmp_path) == tmp_path / "debs" / "r-cran-fake"
    with pytest.raises(RuntimeError, match="apt-get download r-cran-other && dpkg-deb -x"):
        corpora.fetch_deb("r-cran-other", tmp_path)
    with pytest.raises(ValueError, match="not a Debian package name"):
        corpora.fetch_deb("Bad Name; rm", tmp_path)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["a", "b", "c", "d"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4)


def test_token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _word_tokenizer()
    (tmp_path / "text.txt").write_text("a b c d e a b")
    cache = token_ids.TokenCache(tmp_path / "cache")
    tokens = cache.tokens(tmp_path / "text.txt", tokenizer)
    assert tokens.tolist() == [1, 2, 3, 4, 0, 1, 2] and tokens.dtype == torch.long
    assert len(list(cache.root.glob("text-*.safetensors"))) == 1
    monkeypatch.setattr(token_ids, "tokenize_text", lambda *_: pytest.fail("cache missed"))
    assert torch.equal(cache.tokens(tmp_path / "text.txt", tokenizer), tokens)
    assert list(cache.root.glob("*.tmp")) == []
    # A damaged cache file is tokenized again, not trusted.
    monkeypatch.undo()
    (cached,) = cache.root.glob("text-*.safetensors")
    cached.write_bytes(b"junk")
    assert torch.equal(cache.tokens(tmp_path / "text.txt", tokenizer), tokens)


def test_tokenizer_fingerprint_changes_with_vocab() -> None:
    first, second = _word_tokenizer(), _word_tokenizer()
    assert token_ids.tokenizer_fingerprint(first) == token_ids.tokenizer_fingerprint(second)
    second.add_tokens(["zebra"])
    assert token_ids.tokenizer_fingerprint(first) != token_ids.tokenizer_fingerprint(second)


# --- packing and order -------------------------------------------------------------------------


def test_pack_blocks() -> None:
    packed = blocks.pack_blocks(torch.arange(10), 3)
    assert packed.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="corpus of 5 tokens is shorter than one block of 8"):
        blocks.pack_blocks(torch.arange(5), 8)
    with pytest.raises(ValueError, match="must be 1-D"):
        blocks.pack_blocks(torch.zeros(2, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        blocks.pack_blocks(torch.arange(5), 0)


def test_block_order_is_a_seeded_permutation() -> None:
    order = blocks.block_order(100, seed=1, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == blocks.block_order(100, seed=1, epoch=0)
    assert order != blocks.block_order(100, seed=1, epoch=1)
    assert order != blocks.block_order(100, seed=2, epoch=0)
    with pytest.raises(ValueError, match="n_blocks must be >= 1"):
        blocks.block_order(0, seed=1, epoch=0)


@pytest.mark.parametrize("start", [0, 1, 6, 7, 20])
def test_block_sampler_resumes(start: int) -> None:
    sampler = blocks.BlockSampler(n_blocks=7, seed=3)
    walk = [p for p, _ in zip(sampler, range(30), strict=False)]
    resumed = [p for p, _ in zip(sampler.positions(start), range(30 - start), strict=False)]
    assert resumed == walk[start:]
    assert walk[7:14] == [(1, i) for i in blocks.block_order(7, seed=3, epoch=1)]
    assert json.dumps(walk)  # plain ints, easy to log and checkpoint
