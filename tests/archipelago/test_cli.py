"""What a user sees at the command line for bad input: one line naming the problem, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from archipelago.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "train" in out and "data" in out


def test_unknown_command(capsys):
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "model.num_layers=four"], "'model.num_layers' must be an integer"),
    (["--set", "model.bogus=1"], "unknown config key 'model.bogus'"),
    (["--set", "optim.schedule=zigzag"], "optim.schedule"),
])
def test_train_config_errors(capsys, tmp_path, args, needle):
    code, _, err = run_cli(capsys, "train", "--report", str(tmp_path), *args)
    assert code == 2
    assert needle in one_line_error(err)


def test_train_resume_from_corrupt_checkpoint(capsys, tmp_path, data_cache):
    import torch
    from safetensors.torch import save_file

    from archipelago.checkpoint import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ck", {"model.safetensors": {"x": torch.zeros(2)},
                                              "optimizer.safetensors": {"0.step": torch.zeros(())}},
                            {"step": 0})
    save_file({"x": torch.ones(2)}, str(ckpt / "model.safetensors"))
    code, _, err = run_cli(capsys, "train", "--report", str(tmp_path / "r"), "--resume", str(ckpt),
                           "--set", f"data.cache_dir={data_cache}")
    assert code == 2
    assert "sha256 mismatch" in one_line_error(err) and "model.safetensors" in err


def test_train_on_an_empty_corpus(capsys, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("   \n\n")
    code, _, err = run_cli(capsys, "train", "--report", str(tmp_path / "r"),
                           "--set", f"data.corpus={corpus}", "--set", f"data.cache_dir={tmp_path}")
    assert code == 2
    line = one_line_error(err)
    assert str(corpus) in line


def test_an_island_process_leaves_with_its_output_flushed_and_its_status(data_cache):
    """`island run` ends without the interpreter's teardown (archipelago/cli.py): what it printed still
    reaches a pipe, and its status is the command's; an error still exits 2 with its message."""
    argv = [sys.executable, "-m", "archipelago.cli", "island", "run", "--island-id", "x", "--startup-only",
            "--preset", "ci", "--set", f"data.cache_dir={data_cache}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["island_id"] == "x"
    bad = subprocess.run([*argv, "--set", "train.batch_size=0"], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "batch_size" in bad.stderr, bad.stderr
