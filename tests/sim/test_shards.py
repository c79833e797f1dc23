"""`archipelago sim` with a coordinator sharded by fragment (docs/design.md, "Sharded coordinator"):
the same seed and fragments on one coordinator and on two shard processes give the same θ_b, bit for
bit, on every island and on the coordinator(s). Every process is started by the command under test
and killed by PID when it ends; its waits are bounded by `sim.timeout_s`."""

from __future__ import annotations

import json

import pytest

from sim import cli
from tests.conftest import SMALL


def run_sim(out, data_cache, *extra: str) -> dict:
    overrides = [*SMALL, f"data.cache_dir={data_cache}", "diloco.inner_steps=10", "diloco.rounds=3",
                 "sim.timeout_s=600", *extra]
    assert cli.main(["--preset", "ci", "--baseline", "none", "--fragments", "2", "--report", str(out),
                     *[a for o in overrides for a in ("--set", o)]]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_two_shards_give_theta_b_bit_identical_to_one(data_cache, tmp_path):
    one = run_sim(tmp_path / "one", data_cache)
    two = run_sim(tmp_path / "two", data_cache, "coordinator.num_shards=2")
    assert (one["coordinator_shards"], two["coordinator_shards"]) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "two" / "coordinator").glob("shard-*")) == ["shard-0", "shard-1"]
    assert one["theta_b_identical"] is True and two["theta_b_identical"] is True
    assert two["theta_b_sha256"] == one["theta_b_sha256"], "θ_b differs between one coordinator and two shards"
    assert two["final_version"] == one["final_version"] == 3 * 2  # the composite version counts every commit
    assert two["final_eval_loss"] == one["final_eval_loss"]
    assert two["tokens"] == one["tokens"] and two["wan_bytes"] > 0
    print(f"θ_b {one['theta_b_sha256']} (one coordinator) == {two['theta_b_sha256']} (two shards); "
          f"wan_bytes {one['wan_bytes']} vs {two['wan_bytes']}")
