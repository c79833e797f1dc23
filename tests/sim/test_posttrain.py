"""`archipelago posttrain`: a GRPO stage on two island processes through a real coordinator over
loopback gRPC, and bad input as one line naming the field."""

from __future__ import annotations

import json

import pytest

from archipelago.cli import main as cli

FAST = ["posttrain.warmstart_sft_steps=10", "diloco.rounds=2", "diloco.inner_steps=2", "task.heldout_problems=8",
        "task.train_problems=64", "posttrain.eval_problems=4", "grpo.prompts_per_step=2", "grpo.group_size=4",
        "rollout.max_new_tokens=6", "model.dim=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_dim=128", "train.seq_len=32", "train.eval_batches=1"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_grpo_runs_two_islands_through_the_coordinator(tmp_path, data_cache):
    out = tmp_path / "grpo"
    code = cli(["posttrain", "grpo", "--preset", "ci", "--report", str(out),
                *sets(FAST + [f"data.cache_dir={data_cache}"])])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("islands", "outer_rounds", "heldout_accuracy_before", "heldout_accuracy_after",
                "mean_reward_curve", "rollout_tokens_per_s", "seed", "config", "versions"):
        assert key in report, key
    assert report["islands"] == 2 and report["outer_rounds"] == 2
    assert report["final_version"] == 2  # both rounds merged by the coordinator
    assert len(report["mean_reward_curve"]) == 2 and report["rollout_tokens_per_s"] > 0
    assert report["init"]["kind"] == "warmstart-sft"
    assert (out / "reward.png").is_file() and (out / "model" / "manifest.json").is_file()
    islands = [json.loads((out / f"island-{i}.json").read_text()) for i in range(2)]
    assert {i["stage"] for i in islands} == {"grpo"} and all(i["pushes"] == 2 for i in islands)
    assert len({i["theta_b_sha256"] for i in islands}) == 1


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_stages_run_through_the_coordinator(stage, tmp_path, data_cache):
    out = tmp_path / stage
    fast = [s for s in FAST if not s.startswith("diloco.rounds")] + ["diloco.rounds=1", "dpo.prompts_per_mine=4",
                                                                      "dpo.samples_per_prompt=4", "train.batch_size=8"]
    assert cli(["posttrain", stage, "--report", str(out), *sets(fast + [f"data.cache_dir={data_cache}"])]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == stage and report["final_version"] == 1
    assert 0.0 <= report["heldout_accuracy_after"] <= 1.0
    islands = [json.loads((out / f"island-{i}.json").read_text()) for i in range(2)]
    assert all(i["stage"] == stage and i["inner_steps"] == 2 for i in islands)
    if stage == "sft":
        assert all(len(i["loss_per_round"]) == 1 for i in islands)
    else:  # every step either trained on mined pairs or was skipped, and says which
        assert all(len(i["pairs_mined"]) >= 1 for i in islands)


@pytest.mark.parametrize("argv,needle", [
    (["posttrain", "grpo", "--set", "grpo.group_size=1"], "grpo.group_size"),
    (["posttrain", "grpo", "--set", "task.name=chess"], "task.name"),
    (["posttrain", "sft", "--set", "rollout.backend=tpu"], "rollout.backend"),
    (["posttrain", "dpo", "--preset", "nonexistent"], "unknown preset"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    assert cli([*argv, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "r").exists()
