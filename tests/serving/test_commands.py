"""`archipelago generate` and `archipelago serve` as a user runs them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from archipelago.cli import main as cli
from serving import fp8, serve
from serving.export import ExportOptions, export_checkpoint, load_with_transformers
from serving.hf_folder import read_tensors


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    return export_checkpoint(checkpoints["ernie_moe"], tmp_path_factory.mktemp("gen") / "model",
                             ExportOptions(dtype="fp32")).out


def test_generate_prints_the_prompt_and_its_continuation_as_one_last_line(exported, capsys):
    code = cli(["generate", "--model", str(exported), "--prompt", "To be, or not",
                "--max-tokens", "12", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[-1].startswith("To be, or not") and len(lines[-1]) > len("To be, or not")
    cli(["generate", "--model", str(exported), "--prompt", "To be, or not", "--max-tokens", "12",
         "--temperature", "0.8", "--seed", "3"])
    again = capsys.readouterr().out
    cli(["generate", "--model", str(exported), "--prompt", "To be, or not", "--max-tokens", "12",
         "--temperature", "0.8", "--seed", "3"])
    assert capsys.readouterr().out == again


def test_generate_on_a_folder_that_is_not_an_export_is_one_line(tmp_path, capsys):
    code = cli(["generate", "--model", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no config.json" in err


def test_serve_without_vllm_says_how_to_install_it(exported, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serve, "REPO_ROOT", tmp_path)
    code = cli(["serve", "--model", str(exported)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "make serve-env" in err


def test_serve_starts_vllm_serve_with_the_models_settings(exported, monkeypatch, tmp_path):
    """A stand-in `vllm` on PATH records its arguments: the boundary we do not own."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "vllm"
    fake.write_text(f"#!/bin/sh\npython3 -c 'import json, sys; json.dump(sys.argv[1:], open(\"{record}\", \"w\"))' "
                    "\"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code = cli(["serve", "--model", str(exported), "--port", "8123", "--", "--max-num-seqs", "4"])
    argv = json.loads(record.read_text())
    assert code == 0
    assert argv[:2] == ["serve", str(exported)]
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--max-model-len") + 1] == "64"
    assert argv[argv.index("--dtype") + 1] == "float32" and "--enforce-eager" in argv
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == "2G"
    # The export carries a nonzero selection bias, which only vLLM's Transformers backend keeps on CPU.
    assert argv[argv.index("--model-impl") + 1] == "transformers"
    assert argv[-2:] == ["--max-num-seqs", "4"]


def test_an_fp8_moe_export_is_served_dequantized_on_a_host_without_cuda(checkpoints, monkeypatch, tmp_path, capsys):
    """vLLM's CPU backend has no FP8 MoE kernel; `archipelago serve` says so and serves a dequantized copy."""
    fp8_folder = export_checkpoint(checkpoints["qwen3_moe"], tmp_path / "fp8",
                                   ExportOptions(dtype="bf16", fp8=True)).out
    record = tmp_path / "argv.json"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\npython3 -c 'import json, sys; json.dump(sys.argv[1:], open(\"{record}\", \"w\"))' "
                    "\"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert cli(["serve", "--model", str(fp8_folder)]) == 0
    served = Path(json.loads(record.read_text())[1])
    assert served == fp8_folder.resolve().with_name("fp8-dequantized")
    assert "Unsupported FP8 MoE backend" in capsys.readouterr().err
    config = json.loads((served / "config.json").read_text())
    assert "quantization_config" not in config and (served / "tokenizer.json").is_file()
    want = {n: t.to(torch.bfloat16) for n, t in fp8.dequantize_tensors(read_tensors(fp8_folder)).items()}
    got = read_tensors(served)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    model = load_with_transformers(served)  # transformers reads it as an ordinary bf16 model
    assert sum(p.numel() for p in model.parameters()) > 0
    stamp = (served / serve.DEQUANTIZED_STAMP).stat().st_mtime_ns
    assert serve.servable_folder(fp8_folder) == served  # written once: the second serve reuses it
    assert (served / serve.DEQUANTIZED_STAMP).stat().st_mtime_ns == stamp
    # A dense FP8 export, and anything on a host with CUDA, is served as it is.
    dense = export_checkpoint(checkpoints["qwen3"], tmp_path / "dense", ExportOptions(dtype="bf16", fp8=True)).out
    assert serve.servable_folder(dense) == dense
