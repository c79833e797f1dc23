"""The DiLoCo client's configuration (the `[diloco]` table), and what every island and the
coordinator must agree on: which tensors are synced, and the hash of the run's shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from archipelago.config import ConfigError, config_hash
from island.train import Trainer, model_tensors
from protos.quant import CodecError, get_scheme


@dataclass
class DiLoCoConfig:
    inner_steps: int = 50  # H
    fragments: int = 1  # F: streaming DiLoCo syncs fragment f at inner-step offset ⌊f·H/F⌋
    codec: str = "int8-block"  # a registered scheme, or sparse-{k}of{chunk}-{bits}bit (protos/sparse.py)
    # Error feedback's decay β: the island sends Q(Δ + β·e) and keeps e ← Δ + β·e − what it sent.
    # 1: classic error feedback; SparseLoCo (arXiv 2508.15706) uses 0.95 with its sparse codec.
    ef_decay: float = 1.0
    rounds: int = 6  # outer rounds each island runs
    # Inner steps of each round when they are not all H (e.g. short first rounds while islands
    # that leave one random init are still far from linearly connected); empty: H every round.
    round_steps: list[int] = field(default_factory=list)
    eval_every_rounds: int = 1  # island 0 evaluates θ_b after every k-th round; 0: never
    # On those rounds island 0 also evaluates its own model just before the merge (one fragment,
    # no overlap: only then is θ_b right after the sync the merge of that model): the difference
    # is what the merge bought (`merge_gain` in the sim report).
    eval_before_merge: bool = True
    # Overlap (docs/design.md, step 10): keep training while a sync is in flight and merge the new θ_b
    # when it arrives; block only when a fragment is due again before its last sync has merged.
    overlap: bool = False
    # After its last round the island waits until its last pushes are merged, so it ends holding
    # the final θ_b; false: it leaves once they are acknowledged (durable at the coordinator, which
    # applies them without the island), freeing its cluster while slower islands finish. Only with
    # overlap: without it every sync already waits for its merge.
    wait_last_merge: bool = True
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 20
    # How long a call waits for a coordinator that does not answer (failover, restart, etcd outage,
    # cut link) before the island gives up and stops with an error; 0: as long as it takes, saying
    # so in an ERROR line every minute (docs/design.md, "Failure model").
    reconnect_timeout_s: float = 0.0
    # Longest wait between two attempts to reach a coordinator that is away (a failover, a restart,
    # a cut link), for the island's retries and for gRPC's own reconnects: the island is back at
    # most about this long after the coordinator is.
    retry_max_delay_s: float = 1.0
    commit_timeout_s: float = 600.0
    # TLS to the coordinator (PEM paths, `archipelago coordinator certs`): the CA that signed the
    # coordinator's certificate, and this island's client certificate and key for mutual TLS.
    # All empty: plaintext.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Append one JSON line per acknowledged push (and per start) to this file; "{island_id}" in it
    # is replaced by the island's id. Empty: none. The chaos runs read it to count lost updates.
    ack_log: str = ""
    # The codec's compiled kernels (protos/codec_kernels.py): "auto" compiles them at the island's
    # first push (seconds, once per process, repaid over many pushes of a large model); "off" keeps
    # them eager, for short runs or islands that restart often. ARCHIPELAGO_CODEC_COMPILE, when set,
    # wins over this.
    codec_compile: str = "auto"
    # Island-local checkpoints (island/local_checkpoint.py): every this many inner steps (0: none) the
    # island writes its model, AdamW state, data cursor, error-feedback residuals and its rounds' base
    # (θ_b, version, timeline) to local_checkpoint_dir ("{island_id}" replaced), in the background; a
    # restarted process resumes there when the coordinator still accepts that base.
    local_checkpoint_every: int = 0
    local_checkpoint_dir: str = "local-checkpoints/{island_id}"
    # Live telemetry (island/telemetry.py, docs/design.md Observability): Prometheus metrics on this
    # port of metrics_host (0: none), and a progress JSON replaced atomically as the island trains
    # ("{island_id}" is replaced by the island's id; empty: none). Neither changes training.
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    progress_file: str = ""

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.fragments < 1 or self.rounds < 1:
            raise ConfigError("diloco.inner_steps, diloco.fragments and diloco.rounds must be >= 1")
        if self.inner_steps < self.fragments:
            raise ConfigError(f"diloco.inner_steps ({self.inner_steps}) must give every one of the "
                              f"diloco.fragments ({self.fragments}) at least one inner step")
        if self.round_steps:
            if len(self.round_steps) != self.rounds:
                raise ConfigError(f"diloco.round_steps has {len(self.round_steps)} entries, diloco.rounds "
                                  f"is {self.rounds}")
            bad = [s for s in self.round_steps if s < self.fragments]
            if bad:
                raise ConfigError(f"diloco.round_steps entries must give every one of the diloco.fragments "
                                  f"({self.fragments}) at least one inner step, got {bad}")
        try:
            get_scheme(self.codec)
        except CodecError as exc:
            raise ConfigError(f"diloco.codec: {exc}") from None
        if not 0 < self.ef_decay <= 1:
            raise ConfigError(f"diloco.ef_decay must be in (0, 1], got {self.ef_decay}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("diloco.tls_cert and diloco.tls_key go together: give both or neither")
        if not self.reconnect_timeout_s >= 0:
            raise ConfigError(f"diloco.reconnect_timeout_s must be >= 0 (0: no limit), got {self.reconnect_timeout_s}")
        if not self.retry_max_delay_s > 0:
            raise ConfigError(f"diloco.retry_max_delay_s must be > 0, got {self.retry_max_delay_s}")
        if self.codec_compile not in ("auto", "off"):
            raise ConfigError(f"diloco.codec_compile must be auto or off, got {self.codec_compile!r}")
        if self.local_checkpoint_every < 0:
            raise ConfigError(f"diloco.local_checkpoint_every must be >= 0 (0: off), got {self.local_checkpoint_every}")
        if self.local_checkpoint_every and not self.local_checkpoint_dir:
            raise ConfigError("diloco.local_checkpoint_dir must name a folder when local checkpoints are on")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"diloco.metrics_port must be a TCP port or 0 (off), got {self.metrics_port}")

    def steps_in_round(self, round_: int) -> int:
        """Inner steps of (0-based) outer round `round_`."""
        return self.round_steps[round_] if self.round_steps else self.inner_steps

    def fragment_steps(self, round_: int) -> list[int]:
        """The inner steps before each of the round's F syncs, in the order they happen: the round's
        steps split as evenly as the division allows, sync i after step ⌊(i+1)·H/F⌋ of the round
        (H = 50, F = 4: 12, 13, 12, 13)."""
        h, f = self.steps_in_round(round_), self.fragments
        return [(i + 1) * h // f - i * h // f for i in range(f)]

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in_round(r) for r in range(self.rounds))

    def steps_before(self, round_: int) -> int:
        """Inner steps of the rounds before `round_` (the step count when it starts)."""
        return sum(self.steps_in_round(r) for r in range(round_))


def run_config_hash(model_cfg: Any, names_shapes: list[tuple[str, tuple[int, ...]]], fragments: int) -> str:
    """What must agree between every island and the coordinator: model, tensors, fragments."""
    from dataclasses import asdict

    return config_hash({"model": asdict(model_cfg), "tensors": [[n, list(s)] for n, s in names_shapes],
                        "fragments": fragments})


def synced_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The model's floating tensors that DiLoCo syncs (parameters and persistent buffers), by name.

    They are the live storage of the model: writing into them updates the model.
    """
    return {n: t for n, t in sorted(model_tensors(trainer.model).items()) if t.is_floating_point()}
