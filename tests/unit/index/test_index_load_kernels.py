"""The reload's inner loops: the C table build, id hashing and id-map insert give
exactly what the numpy paths give (which the other index tests check against brute
force), including duplicate ids, forced hash collisions and malformed input; and
prefaulting never changes what is being written."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from copyfree import hamming
from copyfree_index import mih, prefault
from copyfree_index.idmap import IdMap
from copyfree_index.ragged import Ragged, hash_items

needs_c = pytest.mark.skipif(
    hamming._scan is None, reason="copyfree._scan is not built (no C compiler)"
)


def both_kernels(monkeypatch: pytest.MonkeyPatch, fn):  # noqa: ANN001, ANN201
    """fn() under the C kernels, then under numpy."""
    out = []
    for kernel in ("c", "numpy"):
        monkeypatch.setattr(hamming, "SCAN_KERNEL", kernel)
        out.append(fn())
    return out


def tables_equal(a: mih.MultiIndex, b: mih.MultiIndex) -> bool:
    return (
        np.array_equal(a._entries, b._entries)
        and np.array_equal(a._caps, b._caps)
        and all(
            (x is None and y is None) or np.array_equal(x, y)
            for x, y in zip(a._slots, b._slots, strict=True)
        )
        and (a.rows, a._used) == (b.rows, b._used)
    )


@needs_c
@pytest.mark.parametrize(
    ("bits", "n", "wide"),
    [
        (16, 5000, 0),
        (32, 70_000, 0),
        (64, 200_000, 0),
        (64, 200_000, 1),
        (128, 9000, 0),
    ],
)
def test_table_build_in_c_equals_numpy(
    bits: int,
    n: int,
    wide: int,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the layout of a bigger collection when `wide` (21- and 22-bit groups)
    layout = mih.choose_layout(bits, mih.WIDE_ROWS if wide else mih.MIN_ROWS)
    assert layout is not None
    words = rng.integers(0, 2**63, (n, max(1, bits // 64)), dtype=np.uint64)
    words[: n // 3] = words[0]  # one crowded bucket per group
    c, numpy = both_kernels(monkeypatch, lambda: mih.MultiIndex.build(layout, words))
    assert tables_equal(c, numpy)


@needs_c
def test_hash_items_in_c_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["", "a", "abcdefg", "abcdefgh", "abcdefghi", "ß" * 9, "x" * 40]
    names += [f"w{i:09d}" for i in range(2000)]
    ids = Ragged.from_strings(names)
    for seed in (0, 1, 2**64 - 1, 0x5EED):
        c, numpy = both_kernels(monkeypatch, lambda s=seed: hash_items(ids, s))
        assert np.array_equal(c, numpy)
    # a slice: offsets into a larger buffer
    part = Ragged(ids.data, ids.offsets[3:50])
    c, numpy = both_kernels(monkeypatch, lambda: hash_items(part, 9))
    assert np.array_equal(c, numpy) and c.size == 46


@needs_c
@pytest.mark.parametrize("collide", [False, True])
def test_id_map_load_in_c_equals_numpy(
    collide: bool, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000 if not collide else 4000
    names = [f"id{int(x)}" for x in rng.integers(0, n // 2, n)]  # many repeats
    ids = Ragged.from_strings(names)
    hashes = hash_items(ids, 11)
    if collide:  # 64 distinct hashes: equality must come from the bytes
        hashes &= np.uint64(63)

    def same(stored: np.ndarray, query: np.ndarray) -> np.ndarray:
        return np.array(
            [names[a] == names[b] for a, b in zip(stored, query, strict=True)], bool
        )

    def load() -> tuple[np.ndarray, np.ndarray, int]:
        m = IdMap(n)
        old = m.load_log(hashes, ids.data, ids.offsets, same)
        rows, _ = m.lookup(hashes, same)
        return np.sort(old), rows, m.live

    (c_old, c_rows, c_live), (np_old, np_rows, np_live) = both_kernels(
        monkeypatch, load
    )
    assert np.array_equal(c_old, np_old) and np.array_equal(c_rows, np_rows)
    assert c_live == np_live == len(set(names))
    # the newest row of every id is the one mapped
    last = {name: row for row, name in enumerate(names)}
    assert c_rows.tolist() == [last[name] for name in names]


@needs_c
def test_kernels_refuse_malformed_input() -> None:
    c = hamming._scan
    words = np.zeros((10, 1), np.uint64)
    rows = np.zeros(10, np.int32)
    with pytest.raises(ValueError, match="one int64 per bucket"):
        c.group_sort(words, 1, 0, 0, 8, np.zeros(10, np.int64), rows, None)
    with pytest.raises(ValueError, match="inside one code word"):
        c.group_sort(words, 1, 0, 60, 8, np.zeros(256, np.int64), rows, None)
    with pytest.raises(ValueError, match="one int32 per row"):
        c.group_sort(words, 1, 0, 0, 8, np.zeros(256, np.int64), rows[:5], None)
    data = np.frombuffer(b"abcdef", np.uint8)
    with pytest.raises(ValueError, match="outside the data"):
        c.hash_items(data, np.array([0, 3, 99], np.int64), 0, np.zeros(2, np.uint64))
    with pytest.raises(ValueError, match="power-of-two"):
        c.idmap_insert(
            np.full(3, -1, np.int32),
            np.zeros(2, np.uint64),
            data,
            np.array([0, 3, 6], np.int64),
            np.zeros(2, np.int64),
        )


def test_prefault_keeps_what_is_written_meanwhile() -> None:
    """The faulting threads map pages without writing them: a writer filling the
    same array at the same time keeps every byte it wrote."""
    a = np.zeros(96 << 20, np.uint8)  # over the threshold: threads do start
    threads = prefault.in_background([a])
    stop = threading.Event()
    step = 1 << 20
    for at in range(0, a.size, step):
        a[at : at + step] = (at // step) % 251 + 1
    stop.set()
    for t in threads:
        t.join()
    expect = (np.arange(a.size // step) % 251 + 1).astype(np.uint8)
    assert np.array_equal(a[::step], expect)
    assert np.all(a[step - 1 :: step] == expect)
    assert prefault.in_background([np.zeros(10, np.uint8)]) == []  # too small
