"""The byte-level pieces: ragged buffers, id hashing, the id map (against a dict, with
forced hash collisions), the metadata record (against protobuf) and the Upsert wire
fast path (against protobuf decoding, and declining what it should)."""

from __future__ import annotations

import numpy as np
import pytest

from copyfree.errors import FailedPrecondition, InvalidInput
from copyfree.v1 import common_pb2, index_pb2
from copyfree_index.idmap import IdMap
from copyfree_index.ragged import Metadata, Ragged, hash_items
from copyfree_index.servicer import IndexServicer
from copyfree_index.settings import IndexSettings
from copyfree_index.shard import ShardIndex
from copyfree_index.store import InMemoryShardStore
from copyfree_index.wire import parse_upsert

WORDS = ["", "a", "ß", "日本語のタイトル", "x" * 7, "y" * 8, "z" * 9, "é" * 40]


def test_ragged_round_trips_and_gathers() -> None:
    r = Ragged.from_strings(WORDS)
    assert r.to_strings() == WORDS and len(r) == len(WORDS)
    assert r.take(np.array([3, 0, 7, 3])).to_strings() == [
        WORDS[3],
        "",
        WORDS[7],
        WORDS[3],
    ]
    assert Ragged.concat([r, r.slice(2, 4)]).to_strings() == WORDS + WORDS[2:4]
    assert r.char_counts().tolist() == [len(w) for w in WORDS]
    assert r.valid_utf8()
    bad = Ragged.from_bytes([b"ok", "é".encode()[:1], b"x"])
    assert not bad.valid_utf8()
    # each item valid alone, the split falls inside a character: refused
    split = Ragged.from_bytes(["é".encode()[:1], "é".encode()[1:]])
    assert not split.valid_utf8()


def test_hashes_depend_on_content_only() -> None:
    r = Ragged.from_strings(WORDS)
    shuffled = Ragged.from_strings(list(reversed(WORDS)))
    assert hash_items(r).tolist() == list(reversed(hash_items(shuffled).tolist()))
    assert len(set(hash_items(r).tolist())) == len(WORDS)
    assert hash_items(r, 1).tolist() != hash_items(r, 2).tolist()
    # bytes past an item's end (the next item) must not leak into its hash
    a = Ragged.from_strings(["abc", "zzzzzzzz"])
    b = Ragged.from_strings(["abc", "qqqqqqqq"])
    assert hash_items(a)[0] == hash_items(b)[0]


@pytest.mark.parametrize("collide", [False, True])
def test_idmap_matches_a_dict(collide: bool, rng: np.random.Generator) -> None:
    """Random upserts (with repeats inside batches), removals and lookups; with
    `collide` every hash is one of 4 values, so probing and the byte comparison do
    all the work."""
    names: list[str] = []
    table = IdMap()
    oracle: dict[str, int] = {}
    data = bytearray()

    def hashes(ids: list[str]) -> np.ndarray:
        h = hash_items(Ragged.from_strings(ids))
        return h & np.uint64(3) if collide else h

    def same_rows(stored: np.ndarray, query: np.ndarray, pending: list[str]):
        return np.array(
            [
                names[int(s)] == pending[int(q)]
                for s, q in zip(stored, query, strict=True)
            ],
            bool,
        )

    for step in range(60):
        batch = [f"id{int(x)}" for x in rng.integers(0, 300, int(rng.integers(1, 40)))]
        rows = np.arange(len(names), len(names) + len(batch), dtype=np.int64)
        names.extend(batch)
        data.extend(b"")
        old = table.upsert(
            hashes(batch), rows, lambda s, q, b=batch: same_rows(s, q, b)
        )
        expect_old = []
        for i, row in zip(batch, rows.tolist(), strict=True):
            if i in oracle:
                expect_old.append(oracle[i])
            oracle[i] = row
        assert sorted(old.tolist()) == sorted(expect_old)
        if step % 3 == 0:
            gone = [f"id{int(x)}" for x in rng.integers(0, 300, 10)]
            removed = table.remove(
                hashes(gone), lambda s, q, g=gone: same_rows(s, q, g)
            )
            for i, r in zip(gone, removed.tolist(), strict=True):
                want = oracle.pop(i, -1)
                assert r == want
        probe = [f"id{x}" for x in range(300)]
        found, _ = table.lookup(hashes(probe), lambda s, q, p=probe: same_rows(s, q, p))
        assert found.tolist() == [oracle.get(i, -1) for i in probe]
        assert table.live == len(oracle)


def test_idmap_grows_and_keeps_everything(rng: np.random.Generator) -> None:
    table = IdMap()
    n = 20_000  # many times the initial table
    ids = [f"k{i}" for i in range(n)]
    h = hash_items(Ragged.from_strings(ids))
    for s in range(0, n, 1000):
        table.upsert(
            h[s : s + 1000],
            np.arange(s, s + 1000, dtype=np.int64),
            lambda a, b: np.zeros(a.size, bool),
        )
    rows, _ = table.lookup(h, lambda a, b: a == b)
    assert rows.tolist() == list(range(n))


def test_metadata_record_is_the_protobuf_wire_form() -> None:
    for meta in [
        Metadata(),
        Metadata(title="Mona Lisa"),
        Metadata("t", "o", "CC0", "https://x.example/" + "p" * 300),
        Metadata(title="", licence="public-domain"),
        Metadata(title="Ünïcödé ✓", owner="日本"),
    ]:
        proto = common_pb2.WorkMetadata(
            title=meta.title, owner=meta.owner, licence=meta.licence, source=meta.source
        )
        assert meta.encode() == proto.SerializeToString()
        assert Metadata.decode(proto.SerializeToString()) == meta
    # unknown fields are skipped, the last value of a field wins (protobuf rules)
    raw = b"\x0a\x01a" + b"\x28\x05" + b"\x0a\x01b" + b"\x31" + bytes(8)
    assert Metadata.decode(raw) == Metadata(title="b")
    with pytest.raises(ValueError):
        Metadata.decode(b"\x0a\x05ab")


# ---------------------------------------------------------------- wire fast path


def servicer(num_shards: int = 1, shard_id: int = 0) -> IndexServicer:
    return IndexServicer(
        ShardIndex(),
        InMemoryShardStore(),
        IndexSettings(shard_id=shard_id, num_shards=num_shards),
    )


def registry_request(n: int, rng: np.random.Generator) -> index_pb2.UpsertRequest:
    return index_pb2.UpsertRequest(
        collection="kolaa",
        kind=common_pb2.COLLECTION_KIND_REGISTRY,
        model=common_pb2.ModelRef(name="cvae", version="1"),
        items=[
            index_pb2.IndexItem(
                id=f"w{i}-ü" if i % 3 else f"{i}" + "x" * 200,
                metadata=common_pb2.WorkMetadata(
                    title=f"T{i}" * (i % 4), owner="KOLAA" if i % 2 else ""
                ),
                keys=common_pb2.DetectionKeys(
                    first_key=rng.bytes(8), second_key=rng.bytes(128)
                ),
            )
            for i in range(n)
        ],
    )


def free_request(
    n: int, rng: np.random.Generator, bits: int = 16
) -> index_pb2.UpsertRequest:
    return index_pb2.UpsertRequest(
        collection="free",
        kind=common_pb2.COLLECTION_KIND_COPYRIGHT_FREE,
        model=common_pb2.ModelRef(name="tbh", version="2"),
        items=[
            index_pb2.IndexItem(
                id=f"f{i}",
                metadata=common_pb2.WorkMetadata(licence="CC0", source="s" * 200),
                code=common_pb2.RetrievalCode(
                    code=rng.bytes(bits // 8), code_bits=bits, fine=rng.bytes(12)
                ),
            )
            for i in range(n)
        ],
    )


def same_batch(a, b) -> bool:
    return (
        a[0] == b[0]
        and a[1].id_list() == b[1].id_list()
        and np.array_equal(a[1].codes, b[1].codes)
        and np.array_equal(a[1].vectors, b[1].vectors)
        and a[1].vectors.dtype == b[1].vectors.dtype
        and a[1].metadata.to_bytes() == b[1].metadata.to_bytes()
    )


@pytest.mark.parametrize("kind", ["registry", "free16", "free64"])
def test_fast_path_equals_protobuf_decoding(
    kind: str, rng: np.random.Generator
) -> None:
    request = {
        "registry": lambda: registry_request(300, rng),
        "free16": lambda: free_request(300, rng),
        "free64": lambda: free_request(300, rng, 64),
    }[kind]()
    raw = request.SerializeToString()
    s = servicer()
    cols = parse_upsert(raw)
    assert cols is not None
    fast = s._fast_batch(cols)
    assert fast is not None
    assert same_batch(fast, s._prepare(index_pb2.UpsertRequest.FromString(raw)))


def field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, out = len(payload), bytearray([tag])
    while size >= 0x80:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + payload


def test_fast_path_declines_and_the_slow_path_names_the_problem(
    rng: np.random.Generator,
) -> None:
    s = servicer()
    good = registry_request(5, rng)
    # an item field twice (protobuf would merge): declined, decoded by protobuf
    item = good.items[0].SerializeToString() + b"\x0a\x01z"
    raw = good.SerializeToString() + field(0x22, item)
    assert parse_upsert(raw) is None
    assert s._prepare_raw(raw)[1].id_list()[-1] == "z"  # type: ignore[index]
    # invalid UTF-8 in an id: declined (protobuf refuses it too)
    bad_id = b"\x0a\x02\xc3\x28"
    assert parse_upsert(field(0x22, bad_id)) is None
    # truncated request
    assert parse_upsert(good.SerializeToString()[:-3]) is None
    # a short key: the fast path declines, the slow path raises with the field name
    short = registry_request(3, rng)
    short.items[2].keys.first_key = b"1234567"
    with pytest.raises(InvalidInput, match=r"items\[2\]\.keys\.first_key must be 8"):
        s._prepare_raw(short.SerializeToString())
    twice = registry_request(3, rng)
    twice.items[2].id = twice.items[0].id
    with pytest.raises(InvalidInput, match=r"items\[2\]\.id .* appears twice"):
        s._prepare_raw(twice.SerializeToString())
    with pytest.raises(FailedPrecondition, match="belongs to shard"):
        servicer(num_shards=4, shard_id=3)._prepare_raw(
            registry_request(40, rng).SerializeToString()
        )
    empty = registry_request(0, rng).SerializeToString()
    assert s._prepare_raw(empty) is None  # nothing to do


def test_record_offsets_widen_past_their_range() -> None:
    """uint32 offsets become int64 past 4 GiB of ids; shown here with uint16."""
    from copyfree_index.shard import _Buffer

    buf = _Buffer(4)
    buf.off = buf.off.astype(np.uint16)
    old = buf.off
    big = Ragged.from_bytes([b"a" * 40_000, b"b" * 40_000])
    buf.append(0, big)
    buf.ensure_rows(4)
    buf.append(2, Ragged.from_strings(["c", "dd"]))
    assert buf.off.dtype == np.int64 and old.dtype == np.uint16
    assert buf.ragged(4).to_bytes() == [b"a" * 40_000, b"b" * 40_000, b"c", b"dd"]
