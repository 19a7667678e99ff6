"""Move a collection from S to S' shards in Redis, verifying counts and checksums.

    python -m copyfree_index.reshard --redis-url redis://redis:6379/0 \\
        --collection kolaa --from 2 --to 3

Offline procedure (the shards must not write meanwhile):
1. scale the index StatefulSet to 0 (or stop the shard processes);
2. run this command: it replays the S old logs, re-partitions the live items by
   copyfree.routing.shard_for(id, S'), writes S' new logs next to the old ones
   (`<log key>:reshard`, same hash tag, so each pair shares a Redis Cluster slot),
   reads them back and compares item count and checksum with the source ("staged");
   then renames every staged key over its live key (one atomic script per shard),
   deletes the logs of shards >= S', and verifies the live keys once more
   ("switched");
3. set INDEX_NUM_SHARDS=S' everywhere (gateway and shards) and scale to S'.
The new meta records `shards` = S', so a shard still configured for S refuses to load.

Crash safety: until "staged" the old logs are untouched (run it again). The plan is
recorded in `copyfree:v1:reshard:<collection>`; a run that finds a staged plan skips
to the switch, whose renames are idempotent, so an interrupted switch is completed by
running the same command again.

The checksum is the sum mod 2^64 of a 64-bit hash of each live item's id, code,
vector and metadata bytes: independent of order and of how items are split into
segments, so old and new layouts compare directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from copyfree_index.ragged import Ragged, hash_items
from copyfree_index.shard import CollectionSpec, ItemBatch, ShardIndex
from copyfree_index.store import (
    KEY_PREFIX,
    RedisClient,
    collections_key,
    connect,
    log_key,
    meta_fields,
    meta_key,
    read_list,
    replay_log,
    snapshot_segments,
    spec_from_meta,
)

log = logging.getLogger("copyfree_index.reshard")

STAGED_SUFFIX = ":reshard"
_PUSH_SEGMENTS = 8  # segments (~1.7 MB each) per RPUSH while staging
_SEEDS = (0x5EED0001, 0x5EED0002, 0x5EED0003, 0x5EED0004)
# KEYS: staged log, live log, staged meta, live meta. A staged meta means this shard
# is not switched yet (an empty shard has a meta but no list).
_SWITCH_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
else
  redis.call('DEL', KEYS[2])
end
redis.call('RENAME', KEYS[3], KEYS[4])
return 1
"""


class ReshardError(RuntimeError):
    """The data does not add up: nothing was switched (or the switch is incomplete
    and the message says how to finish it)."""


@dataclass(frozen=True)
class Tally:
    items: int
    checksum: int  # sum of item hashes mod 2^64

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.items + other.items, (self.checksum + other.checksum) % 2**64)


@dataclass(frozen=True)
class Summary:
    collection: str
    from_shards: int
    to_shards: int
    items: int
    checksum: str
    per_shard: list[int]
    seconds: float


def item_hashes(batch: ItemBatch) -> NDArray[np.uint64]:
    """A 64-bit hash per item over id, code, vector and metadata (fixed seeds)."""
    n = len(batch)
    codes = _fixed(np.ascontiguousarray(batch.codes).view(np.uint8), n)
    vectors = _fixed(
        np.ascontiguousarray(
            batch.vectors.astype(batch.vectors.dtype.newbyteorder("<"))
        ).view(np.uint8),
        n,
    )
    parts = [batch.ids, codes, vectors, batch.metadata]
    h = np.zeros(n, np.uint64)
    for seed, part in zip(_SEEDS, parts, strict=True):
        h = h * np.uint64(0x100000001B3) ^ hash_items(part, seed)
    return h


def tally(batch: ItemBatch) -> Tally:
    hashes = item_hashes(batch)
    return Tally(len(batch), int(hashes.sum(dtype=np.uint64)) if hashes.size else 0)


def _fixed(rows: NDArray[np.uint8], n: int) -> Ragged:
    width = rows.size // n if n else 0
    return Ragged(rows.reshape(-1), np.arange(n + 1, dtype=np.int64) * width)


def owners(ids: Ragged, num_shards: int) -> NDArray[np.int64]:
    """copyfree.routing.shard_for for every id."""
    digests = b"".join(
        hashlib.blake2b(b, digest_size=8).digest() for b in ids.to_bytes()
    )
    return (np.frombuffer(digests, ">u8") % np.uint64(num_shards)).astype(np.int64)


class Resharder:
    def __init__(
        self, client: RedisClient, collection: str, *, prefix: str = KEY_PREFIX
    ) -> None:
        self.client, self.name, self.prefix = client, collection, prefix

    @property
    def plan_key(self) -> str:
        return f"{self.prefix}:reshard:{self.name}"

    # ------------------------------------------------------------ reading

    def read_shard(
        self, shard: int, *, staged: bool = False
    ) -> tuple[CollectionSpec, ItemBatch, dict[str, str]] | None:
        suffix = STAGED_SUFFIX if staged else ""
        raw = self.client.hgetall(meta_key(self.prefix, self.name, shard) + suffix)
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields:
            return None
        spec = spec_from_meta(self.name, fields)
        memory = ShardIndex()
        segments = read_list(
            self.client, log_key(self.prefix, self.name, shard) + suffix
        )
        replay_log(memory, spec, segments, int(fields.get("rows", 0)))
        return spec, memory.live_batch(self.name), fields

    def read_all(
        self, shards: int, *, staged: bool = False
    ) -> tuple[CollectionSpec, list[ItemBatch]]:
        """Live items of shards 0..shards-1 (an absent shard holds none)."""
        found = [self.read_shard(s, staged=staged) for s in range(shards)]
        specs = {got[0] for got in found if got is not None}
        if not specs:
            raise ReshardError(
                f"collection {self.name!r} not found in shards 0..{shards - 1}"
            )
        if len(specs) > 1:
            raise ReshardError(f"the shards disagree on the collection: {specs}")
        spec = specs.pop()
        for s, got in enumerate(found):
            recorded = got[2].get("shards") if got is not None else None
            if not staged and recorded is not None and int(recorded) != shards:
                raise ReshardError(
                    f"shard {s} says the collection is partitioned for {recorded} "
                    f"shards, not {shards}: is --from right?"
                )
        return spec, [
            got[1] if got is not None else ItemBatch.empty(spec) for got in found
        ]

    # ------------------------------------------------------------ the steps

    def stage(self, old: int, new: int) -> tuple[CollectionSpec, Tally, list[int]]:
        spec, batches = self.read_all(old)
        assert spec is not None
        source = Tally(0, 0)
        for s, batch in enumerate(batches):
            wrong = np.flatnonzero(owners(batch.ids, old) != s)
            if wrong.size:
                log.warning(
                    "shard %d holds %d items of other shards (kept)", s, wrong.size
                )
            source = source + tally(batch)
        everything = ItemBatch.concat(batches, spec)
        target = owners(everything.ids, new)
        per_shard: list[int] = []
        for t in range(new):
            rows = np.flatnonzero(target == t)
            part = _take(everything, rows)
            per_shard.append(len(part))
            self._write_staged(spec, t, part, new)
        log.info("staged %d items into %d shards: %s", source.items, new, per_shard)
        staged = Tally(0, 0)
        _, staged_batches = self.read_all(new, staged=True)
        for t, batch in enumerate(staged_batches):
            if np.any(owners(batch.ids, new) != t):
                raise ReshardError(f"staged shard {t} holds items of another shard")
            staged = staged + tally(batch)
        if staged != source:
            raise ReshardError(
                f"staged data does not match the source: {staged} != {source}; "
                "the live keys are untouched"
            )
        self.client.hset(
            self.plan_key,
            mapping={
                "phase": "staged",
                "from": str(old),
                "to": str(new),
                "items": str(source.items),
                "checksum": str(source.checksum),
            },
        )
        return spec, source, per_shard

    def switch(self, old: int, new: int, expected: Tally) -> list[int]:
        for t in range(new):
            live_log = log_key(self.prefix, self.name, t)
            live_meta = meta_key(self.prefix, self.name, t)
            # one slot (shared hash tag), one atomic script: works on a cluster too
            self.client.eval(
                _SWITCH_SCRIPT,
                4,
                live_log + STAGED_SUFFIX,
                live_log,
                live_meta + STAGED_SUFFIX,
                live_meta,
            )
            self.client.sadd(collections_key(self.prefix, t), self.name)
        for s in range(new, old):
            self.client.delete(
                log_key(self.prefix, self.name, s), meta_key(self.prefix, self.name, s)
            )
            self.client.srem(collections_key(self.prefix, s), self.name)
        self.client.hset(self.plan_key, "phase", "switched")
        _, batches = self.read_all(new)
        final = Tally(0, 0)
        for t, batch in enumerate(batches):
            if np.any(owners(batch.ids, new) != t):
                raise ReshardError(
                    f"shard {t} holds items of another shard after the switch"
                )
            final = final + tally(batch)
        if final != expected:
            raise ReshardError(
                f"after the switch: {final} != {expected} (the plan key stays)"
            )
        self.client.delete(self.plan_key)
        return [len(b) for b in batches]

    def run(self, old: int, new: int) -> Summary:
        started = time.perf_counter()
        plan = {
            _text(k): _text(v) for k, v in self.client.hgetall(self.plan_key).items()
        }
        if plan:
            if (int(plan["from"]), int(plan["to"])) != (old, new):
                raise ReshardError(
                    f"an unfinished re-shard {plan['from']} -> {plan['to']} is "
                    f"recorded in {self.plan_key}: run that one again to finish it"
                )
            log.info("resuming a %s re-shard %d -> %d", plan["phase"], old, new)
            expected = Tally(int(plan["items"]), int(plan["checksum"]))
        else:
            _, expected, _ = self.stage(old, new)
        per_shard = self.switch(old, new, expected)
        return Summary(
            self.name,
            old,
            new,
            expected.items,
            f"{expected.checksum:016x}",
            per_shard,
            round(time.perf_counter() - started, 3),
        )

    def _write_staged(
        self, spec: CollectionSpec, shard: int, part: ItemBatch, shards: int
    ) -> None:
        staged_log = log_key(self.prefix, self.name, shard) + STAGED_SUFFIX
        staged_meta = meta_key(self.prefix, self.name, shard) + STAGED_SUFFIX
        self.client.delete(staged_log, staged_meta)
        segments = snapshot_segments(part)
        for i in range(0, len(segments), _PUSH_SEGMENTS):
            self.client.rpush(staged_log, *segments[i : i + _PUSH_SEGMENTS])
        self.client.hset(staged_meta, mapping=meta_fields(spec, shards, len(part)))  # type: ignore[arg-type]


def _take(batch: ItemBatch, rows: NDArray[np.int64]) -> ItemBatch:
    return ItemBatch(
        batch.ids.take(rows),
        batch.codes[rows],
        batch.vectors[rows],
        batch.metadata.take(rows),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m copyfree_index.reshard",
        description="Move a collection from S to S' shards (shards stopped meanwhile).",
    )
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--collection", required=True)
    parser.add_argument(
        "--from", dest="old", type=int, required=True, help="current shard count"
    )
    parser.add_argument(
        "--to", dest="new", type=int, required=True, help="new shard count"
    )
    parser.add_argument("--key-prefix", default=KEY_PREFIX)
    parser.add_argument("--cluster", choices=["auto", "yes", "no"], default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.old < 1 or args.new < 1:
        parser.error("shard counts must be >= 1")
    cluster = {"auto": None, "yes": True, "no": False}[args.cluster]
    client = connect(args.redis_url, cluster=cluster)
    try:
        summary = Resharder(client, args.collection, prefix=args.key_prefix).run(
            args.old, args.new
        )
    except ReshardError as e:
        log.error("%s", e)
        return 1
    finally:
        client.close()
    sys.stdout.write(json.dumps(asdict(summary)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
