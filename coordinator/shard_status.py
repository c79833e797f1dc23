"""One view of a coordinator sharded by fragment (docs/design.md, "Sharded coordinator"): the
shards' own status replies side by side, and a combined summary of the run.

`archipelago coordinator status --address "a:1;b:2"` asks every shard (in shard order) and merges
what they say here. Each shard counts only its own commits, so the run's version is the sum of the
shards' versions (the composite version islands hold); each fragment's round is its owner's; an
island is live (or finished) for the run when it is on every shard that answered; pushes and bytes
add up across shards.
"""

from __future__ import annotations

from typing import Any


def island_rows(islands: list[Any]) -> list[dict[str, Any]]:
    """`StatusReply.islands` as plain dicts."""
    return [{"island_id": i.island_id, "epoch": i.epoch, "state": i.state, "last_seen_s": i.last_seen_s,
             "pushes": i.pushes, "bytes_in": i.bytes_in, "bytes_out": i.bytes_out} for i in islands]


def merge_status(addresses: list[str], replies: list[dict[str, Any] | str]) -> dict[str, Any]:
    """`replies[i]`: shard i's status detail (its JSON, with `islands` from `island_rows`), or the
    error text when it did not answer. Returns {"shards": [...], "combined": {...}}."""
    n = len(addresses)
    shards: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, (address, reply) in enumerate(zip(addresses, replies, strict=True)):
        if isinstance(reply, str):
            shards.append({"shard": i, "address": address, "error": reply})
            problems.append(f"shard {i} ({address}) did not answer: {reply}")
            continue
        index, count = reply.get("shard_index", 0), reply.get("num_shards", 1)
        if (index, count) != (i, n):
            problems.append(f"the coordinator at {address} (shard {i} of {n} by its place in the list) says it is "
                            f"shard {index} of {count}")
        if reply.get("view") == "local":
            problems.append(f"shard {i} ({address}) answers from its own view, its store is away: "
                            f"{reply.get('view_reason', '')}")
        shards.append({"shard": i, "address": address, **reply})
    up = [s for s in shards if "error" not in s]
    rounds: dict[int, int] = {}
    for s in up:
        for f in s.get("fragments_owned", range(len(s["rounds"]))):
            rounds[f] = s["rounds"][f]
    islands: dict[str, dict[str, Any]] = {}
    for s in up:
        for row in s.get("islands", []):
            entry = islands.setdefault(row["island_id"], {"island_id": row["island_id"], "states": [None] * n,
                                                          "pushes": 0, "bytes_in": 0, "bytes_out": 0})
            entry["states"][s["shard"]] = row["state"]
            for key in ("pushes", "bytes_in", "bytes_out"):
                entry[key] += row[key]

    def on_every_shard(key: str) -> list[str]:
        sets = [set(s.get(key, [])) for s in up]
        return sorted(set.intersection(*sets)) if sets else []

    combined = {
        "num_shards": n, "shards_answering": len(up),
        "version": sum(s["version"] for s in up),  # the composite version: Σ of the shards' versions
        "shard_versions": [s.get("version") for s in shards],
        "timelines": [s.get("timeline") for s in shards],
        "rounds": [rounds.get(f) for f in range(max(rounds) + 1)] if rounds else [],
        "pending_pushes": sum(s.get("pending_pushes", 0) for s in up),
        "live_islands": on_every_shard("live_islands"),
        "finished_islands": on_every_shard("finished_islands"),
        "islands": sorted(islands.values(), key=lambda r: r["island_id"]),
        "last_checkpoints": [s.get("last_checkpoint") for s in shards],
        "problems": problems,
    }
    return {"shards": shards, "combined": combined}


