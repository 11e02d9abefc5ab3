"""Sharding the per-image stages (cam, crf, predict) across processes or machines.

A shard ``i/N`` takes the images ``ids[i::N]`` of the split, writes their files into the stage's usual
folder (a shared filesystem works) and records what it produced in ``<folder>/shards/<i>-of-<N>.json``;
it writes no manifest. The merge (the same stage run without ``--shard``) checks that the records of
every shard exist, are disjoint and together cover every image exactly once, then writes the manifest.
Under ``torchrun`` the shard comes from ``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from wsss.errors import ConfigError, DataError
from wsss.io import read_json, write_json

Shard = tuple[int, int]  # (index, count)


def parse_shard(text: str) -> Shard:
    """``"i/N"`` with ``0 <= i < N`` -> ``(i, N)``."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < N")
    return i, n


def env_shard() -> Shard | None:
    """The torchrun shard ``(RANK, WORLD_SIZE)`` when ``WORLD_SIZE`` > 1, else None."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), n) if n > 1 else None


def shard_ids(ids: Sequence[str], shard: Shard) -> list[str]:
    i, n = shard
    return list(ids[i::n])


def write_shard_record(out: str | Path, stage: str, key: str, shard: Shard, ids: Sequence[str]) -> Path:
    path = Path(out) / "shards" / f"{shard[0]}-of-{shard[1]}.json"
    write_json(path, {"stage": stage, "key": key, "shard": list(shard), "ids": list(ids)})
    return path


def check_shards(out: str | Path, key: str, ids: Sequence[str]) -> int:
    """Verify the shard records in ``out/shards`` (if any): same key, all ``N`` shards present, disjoint,
    covering ``ids`` exactly. Returns the number of shards (0 when the stage was not sharded)."""
    folder = Path(out) / "shards"
    records = [read_json(p) for p in sorted(folder.glob("*-of-*.json"))] if folder.is_dir() else []
    records = [r for r in records if r.get("key") == key]
    if not records:
        return 0
    counts = {r["shard"][1] for r in records}
    if len(counts) != 1:
        raise DataError(f"shard records disagree on the shard count ({sorted(counts)})", folder)
    n = counts.pop()
    have = {r["shard"][0] for r in records}
    if have != set(range(n)):
        missing = sorted(set(range(n)) - have)
        raise DataError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} have not finished; run them, "
                        f"or use --force to redo the stage unsharded", folder)
    seen: dict[str, int] = {}
    for r in records:
        for sid in r["ids"]:
            if sid in seen:
                raise DataError(f"image {sid} was produced by shard {seen[sid]}/{n} and by shard {r['shard'][0]}/{n}", folder)
            seen[sid] = r["shard"][0]
    missing_ids = [sid for sid in ids if sid not in seen]
    extra = sorted(set(seen) - set(ids))
    if missing_ids or extra:
        raise DataError(f"shards cover {len(seen)} images but the split has {len(ids)} "
                        f"(missing e.g. {missing_ids[:1]}, unexpected e.g. {extra[:1]})", folder)
    return n
