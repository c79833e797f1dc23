"""vLLM, run from its own venv (`make serve-env`), gives our greedy tokens and log-probabilities
on exported folders of every layout we export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from island.sampling import SamplingConfig, generate
from serving.export import ExportOptions, export_checkpoint
from serving.hf_folder import load_exported
from tests.serving.conftest import VARIANTS, make_checkpoint

REPO = Path(__file__).resolve().parents[2]
SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
MAX_TOKENS = 8
# Both sides compute in fp32; vLLM's CPU kernels sum in another order.
LOGPROB_TOLERANCE = 1e-3

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not SERVE_PYTHON.is_file(),
                       reason=f"{SERVE_PYTHON} does not exist; `make serve-env` creates it"),
]


@pytest.fixture(scope="module")
def vllm_results(checkpoints, corpus, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """name -> (folder, vLLM's answer), from one run of serving/vllm_check.py over all folders.

    'ernie_moe' carries a large random expert bias, which vLLM's CPU router would drop, so it is
    served by vLLM's Transformers backend; 'ernie_moe_unbiased' is the same layout with the bias
    held at zero, served by vLLM's own MoE layer.
    """
    root = tmp_path_factory.mktemp("vllm")
    sources = {name: checkpoints[name] for name in VARIANTS}
    sources["ernie_moe_unbiased"] = make_checkpoint(root / "unbiased", corpus, "tiny-moe",
                                                    ["model.qk_norm=false", "model.router_bias_update_rate=0.0"])
    folders = {name: export_checkpoint(ckpt, root / name, ExportOptions(dtype="fp32")).out
               for name, ckpt in sources.items()}
    run = subprocess.run([str(SERVE_PYTHON), str(REPO / "serving" / "vllm_check.py"),
                          *map(str, folders.values()), "--max-tokens", str(MAX_TOKENS)],
                         capture_output=True, text=True, timeout=1500, cwd=root)
    assert run.returncode == 0, run.stderr[-4000:]
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: (folder, answers[str(folder)]) for name, folder in folders.items()}


def compare_with_ours(folder: Path, theirs: dict) -> None:
    model, tokenizer, _ = load_exported(folder)
    prompts = [tokenizer.encode(p) for p in theirs["prompts"]]
    assert prompts == theirs["prompt_token_ids"], "vLLM tokenized differently"
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=MAX_TOKENS, temperature=0.0))
    worst = 0.0
    with torch.no_grad():
        for prompt, completion, out_lp, prompt_lp in zip(prompts, ours, theirs["logprobs"],
                                                         theirs["prompt_logprobs"], strict=True):
            ids = prompt + completion.token_ids
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
            mine = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            worst = max(worst, float((mine - torch.tensor(prompt_lp + out_lp)).abs().max()))
    assert [c.token_ids for c in ours] == theirs["token_ids"]
    assert worst <= LOGPROB_TOLERANCE, f"max |Δ log p| = {worst:.3g}"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["qwen3", "llama", "qwen3_moe", "ernie_moe_unbiased", "ernie_moe"])
def test_vllm_greedy_tokens_and_logprobs_match_ours(name, vllm_results):
    folder, theirs = vllm_results[name]
    assert theirs["model_impl"] == ("transformers" if name == "ernie_moe" else "auto")
    compare_with_ours(folder, theirs)
