"""The rollout engine: batched sampling of chat completions for post-training and evaluation.

The default backend is our own KV-cache sampler (island.sampling), which runs wherever the model
trains. `backend = "vllm"` hands generation to vLLM instead: the current policy is exported to a
Hugging Face folder (serving.export) and loaded by `vllm.LLM` whenever its weights changed; it is
used only when vLLM is importable in this environment, and refused with a message otherwise.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from archipelago.config import ConfigError
from island.data.tokenizer import Tokenizer
from island.model import Transformer
from island.sampling import Completion, SamplingConfig, generate
from posttrain.chat import prompt_ids, stop_ids
from posttrain.tasks import Problem, Task


@dataclass
class RolloutConfig:
    backend: str = "local"  # local | vllm
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    max_batch: int = 256  # sequences generated together

    def __post_init__(self) -> None:
        if self.backend not in ("local", "vllm"):
            raise ConfigError(f"rollout.backend must be local or vllm, got '{self.backend}'")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)
        if self.max_batch < 1:
            raise ConfigError(f"rollout.max_batch must be positive, got {self.max_batch}")


class RolloutEngine:
    """Samples completions for chat prompts from `model`; counts tokens and seconds."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: RolloutConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.tokens = 0
        self.seconds = 0.0
        self._vllm = _VLLMBackend(model, tokenizer) if cfg.backend == "vllm" else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def sample(self, prompts: Sequence[str], samples: int, seed: int,
               temperature: float | None = None) -> list[Completion]:
        """`samples` completions per prompt, grouped: [p0 s0, p0 s1, ..., p1 s0, ...]."""
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        ids = [p for p in ids for _ in range(samples)]
        temp = self.cfg.temperature if temperature is None else temperature
        start = time.perf_counter()
        if self._vllm is not None:
            out = self._vllm.generate(ids, temp, self.cfg, seed)
        else:
            out = []
            for lo in range(0, len(ids), self.cfg.max_batch):
                cfg = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=temp,
                                     top_p=self.cfg.top_p, stop_token_ids=stop_ids(self.tokenizer),
                                     seed=seed + lo)
                out += generate(self.model, ids[lo:lo + self.cfg.max_batch], cfg, self.tokenizer.decode,
                                pad_id=self.tokenizer.pad_id)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(c.token_ids) for c in out)
        return out


def accuracy(engine: RolloutEngine, task: Task, problems: Sequence[Problem]) -> float:
    """Fraction of `problems` the model solves with greedy decoding."""
    if not problems:
        raise ValueError("no problems to evaluate")
    completions = engine.sample([p.prompt for p in problems], 1, seed=0, temperature=0.0)
    return sum(task.safe_score(p, c.text or "") for p, c in zip(problems, completions, strict=True)) / len(problems)


class _VLLMBackend:
    """vLLM generation of our model through an exported Hugging Face folder."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ConfigError("rollout.backend = 'vllm' needs vLLM importable in this environment "
                              "(see `make serve-env`); use rollout.backend = 'local' otherwise") from exc
        self.model, self.tokenizer = model, tokenizer
        self.folder = Path(tempfile.mkdtemp(prefix="archipelago-rollout-"))
        self.llm = None
        self.loaded_digest = ""

    def _weights_digest(self) -> str:
        h = hashlib.sha256()
        for t in self.model.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def _ensure_loaded(self) -> None:
        digest = self._weights_digest()
        if self.llm is not None and digest == self.loaded_digest:
            return
        import shutil

        from vllm import LLM

        from serving.export import ExportOptions, model_layout, write_folder

        layout = model_layout(self.model)
        shutil.rmtree(self.folder, ignore_errors=True)
        write_folder(self.folder, self.model, self.tokenizer, layout, ExportOptions(dtype="fp32"))
        self.llm = LLM(model=str(self.folder), dtype="float32", enforce_eager=True,
                       max_model_len=self.model.cfg.max_seq_len)
        self.loaded_digest = digest

    def generate(self, prompts: list[list[int]], temperature: float, cfg: RolloutConfig,
                 seed: int) -> list[Completion]:
        from vllm import SamplingParams

        self._ensure_loaded()
        params = SamplingParams(temperature=temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                stop_token_ids=list(stop_ids(self.tokenizer)), seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            body = ids[:-1] if ids and ids[-1] in stop_ids(self.tokenizer) else ids
            reason = "stop" if o.outputs[0].finish_reason == "stop" else "length"
            result.append(Completion(ids, self.tokenizer.decode(body), reason))
        return result


__all__ = ["RolloutConfig", "RolloutEngine", "accuracy"]
