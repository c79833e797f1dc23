"""Export contracts: transformers reproduces our logits, the tokenizer encodes as ours, FP8 files
dequantize to our FP8 weights, the gate refuses, and bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from archipelago.cli import main as cli
from island.data import Tokenizer
from island.train import model_tensors
from serving import fp8
from serving.cli import export_gated
from serving.export import ExportOptions, export_checkpoint, load_checkpoint, load_with_transformers
from serving.hf_folder import INDEX, has_selection_bias, load_exported, read_tensors
from serving.hf_names import QWEN3_MOE, ExportError, to_hf
from tests.serving.conftest import VARIANTS

TOLERANCE = 1e-4
TEXTS = ["To be, or not to be", "In 1599: 1234 + 5678 = 6912", "Ünïcödé — café 東京 🙂",
         "<|system|>x<|end|><|user|>hi<|end|><|assistant|>ok<|endoftext|>", "  spaces\n\ttabs\r\n", "<|pad|>"]


@pytest.fixture(scope="module")
def fp32_exports(checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exports")
    return {name: export_checkpoint(checkpoints[name], root / name, ExportOptions(dtype="fp32", verify=True))
            for name in VARIANTS}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_reproduces_our_logits_in_fp32(name, fp32_exports, checkpoints):
    report = fp32_exports[name]
    assert report.layout.architecture == VARIANTS[name][2]
    assert report.verify["max_abs_logit_diff"] <= TOLERANCE
    assert report.verify["max_abs_logit_diff_vs_checkpoint"] <= TOLERANCE
    original, _, _ = load_checkpoint(checkpoints[name])
    theirs = load_with_transformers(report.out)
    tokenizer = Tokenizer.load(report.out / "tokenizer.json")
    with torch.no_grad():
        for text in TEXTS[:4]:
            ids = torch.tensor([tokenizer.encode(text)])
            assert (theirs(input_ids=ids).logits - original(ids)).abs().max() <= TOLERANCE, text


def test_the_expert_bias_is_exported_and_changes_routing(fp32_exports, checkpoints):
    """The Ernie checkpoint carries a random bias: zeroing it in transformers must move the logits."""
    theirs = load_with_transformers(fp32_exports["ernie_moe"].out)
    original, _, _ = load_checkpoint(checkpoints["ernie_moe"])
    ids = torch.tensor([Tokenizer.load(fp32_exports["ernie_moe"].out / "tokenizer.json").encode(TEXTS[0])])
    with torch.no_grad():
        for name, buf in theirs.named_parameters():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        assert (theirs(input_ids=ids).logits - original(ids)).abs().max() > 10 * TOLERANCE


def test_only_the_biased_export_reports_a_selection_bias(fp32_exports):
    """`archipelago serve` picks vLLM's Transformers backend on CPU by this answer."""
    assert {name: has_selection_bias(report.out) for name, report in fp32_exports.items()} == {
        "qwen3": False, "llama": False, "qwen3_moe": False, "ernie_moe": True}


def test_moe_with_qk_norm_and_a_shared_expert_is_refused_naming_why(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="QK-norm and a shared expert .* and a nonzero expert_bias"):
        export_checkpoint(checkpoints["refused"], tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists()


def test_autotokenizer_encodes_and_decodes_exactly_as_ours(fp32_exports):
    folder = fp32_exports["qwen3"].out
    ours = Tokenizer.load(folder / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [0, 5]


def test_bf16_export_round_trips_through_our_reverse_mapping(checkpoints, tmp_path):
    report = export_checkpoint(checkpoints["ernie_moe"], tmp_path / "bf16", ExportOptions(dtype="bf16"))
    assert json.loads((report.out / "config.json").read_text())["dtype"] == "bfloat16"
    original, _, _ = load_checkpoint(checkpoints["ernie_moe"])
    back, _, _ = load_exported(report.out)
    for (name, a), b in zip(original.state_dict().items(), back.state_dict().values(), strict=True):
        expected = a if name.endswith("expert_bias") else a.to(torch.bfloat16).float()
        assert torch.equal(expected, b), name


def test_sharded_export_loads_in_transformers(checkpoints, tmp_path):
    report = export_checkpoint(checkpoints["qwen3"], tmp_path / "sharded",
                               ExportOptions(dtype="fp32", max_shard_bytes=200_000, verify=True))
    index = json.loads((report.out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert report.verify["max_abs_logit_diff"] <= TOLERANCE


def test_fp8_weights_dequantize_to_our_fp8_quantization_exactly(checkpoints, tmp_path):
    report = export_checkpoint(checkpoints["qwen3_moe"], tmp_path / "fp8",
                               ExportOptions(dtype="bf16", fp8=True, verify=True))
    assert report.verify["max_abs_logit_diff"] <= TOLERANCE  # transformers on the same (dequantized) weights
    stored = read_tensors(report.out)
    original, _, _ = load_checkpoint(checkpoints["qwen3_moe"])
    hf = to_hf(model_tensors(original), original.cfg, QWEN3_MOE)
    quantized = [n for n in hf if fp8.is_quantized_weight(n)]
    assert any(".experts.3." in n for n in quantized) and "model.layers.1.mlp.gate.weight" not in quantized
    for name in quantized:
        q, scale = fp8.quantize(hf[name])
        assert stored[name].dtype == torch.float8_e4m3fn and scale.shape == (hf[name].shape[0], 1)
        assert torch.equal(stored[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(stored[name.replace("weight", "weight_scale")], scale), name
        assert (fp8.dequantize(q, scale) - hf[name]).abs().max() <= hf[name].abs().max() / 16
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert stored[name].dtype == torch.bfloat16


def test_fp8_files_load_with_compressed_tensors_own_dequantizer(checkpoints, tmp_path):
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    report = export_checkpoint(checkpoints["ernie_moe"], tmp_path / "fp8", ExportOptions(fp8=True))
    config = json.loads((report.out / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(config).format == "float-quantized"
    stored = read_tensors(report.out)
    theirs = CompressedTensorsDequantizer(report.out, dtype=torch.float32).validate(dict(stored))
    ours = fp8.dequantize_tensors(stored)
    assert theirs.keys() == ours.keys(), ct.__version__
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor.to(theirs[name].dtype)), name


def test_the_gate_refuses_a_checkpoint_below_threshold_naming_the_metric(checkpoints, tmp_path, capsys):
    gates = tmp_path / "gates.toml"
    gates.write_text("[thresholds]\neval_loss_max = 0.5\n")
    code = cli(["export", "--checkpoint", str(checkpoints["qwen3"]), "--out", str(tmp_path / "m"),
                "--gate", str(gates)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "eval_loss" in err and "> eval_loss_max = 0.5" in err
    assert not (tmp_path / "m").exists()


def test_the_gate_passes_and_writes_promotion_json(checkpoints, tmp_path):
    gates = tmp_path / "gates.toml"
    gates.write_text("[thresholds]\neval_loss_max = 50.0\n")
    report = export_gated(checkpoints["qwen3"], tmp_path / "m", ExportOptions(), gates)
    record = json.loads((report.out / "promotion.json").read_text())
    assert record["passed"] and 0 < record["metrics"]["eval_loss"] < 50
    assert record["thresholds"] == {"eval_loss_max": 50.0}


def test_the_gate_measures_task_accuracy_on_held_out_problems(checkpoints, tmp_path, capsys):
    gates = tmp_path / "gates.toml"
    gates.write_text("[thresholds]\ntask_accuracy_min = 0.5\neval_loss_max = 50.0\n\n"
                     "[task]\nname = \"arithmetic\"\ndigits = 2\nheldout_problems = 8\n")
    code = cli(["export", "--checkpoint", str(checkpoints["qwen3"]), "--out", str(tmp_path / "m"),
                "--gate", str(gates)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "task_accuracy = 0.0000 < task_accuracy_min = 0.5" in err  # an untrained model
    gates.write_text("[thresholds]\ntask_accuracy_min = 0.0\n\n[task]\nheldout_problems = 8\n")
    report = export_gated(checkpoints["qwen3"], tmp_path / "m", ExportOptions(), gates)
    record = json.loads((report.out / "promotion.json").read_text())
    assert record["metrics"] == {"task_accuracy": 0.0} and record["task"]["heldout_problems"] == 8
    gates.write_text("[thresholds]\ntask_accuracy_min = 0.5\n\n[task]\nname = \"chess\"\n")
    assert cli(["export", "--checkpoint", str(checkpoints["qwen3"]), "--out", str(tmp_path / "n"),
                "--gate", str(gates)]) == 2
    bad = capsys.readouterr().err
    assert "[task]" in bad and "task.name" in bad


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "{tmp}/missing"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--dtype", "fp16"], "--dtype must be one of bf16, fp32"),
    (["--checkpoint", "{ckpt}", "--max-shard-size", "lots"], "--max-shard-size"),
    (["--checkpoint", "{ckpt}", "--gate", "{tmp}/gates.toml"], "gates file"),
    (["--checkpoint", "{corrupt}"], "sha256 mismatch"),
])
def test_bad_input_is_one_line(args, needle, checkpoints, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in checkpoints["llama"].iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    blob = bytearray((corrupt / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(blob))
    argv = [a.format(tmp=tmp_path, ckpt=checkpoints["llama"], corrupt=corrupt) for a in args]
    code = cli(["export", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
