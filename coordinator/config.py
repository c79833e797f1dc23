"""The coordinator's typed config: the `[coordinator]` table of a preset."""

from __future__ import annotations

from dataclasses import dataclass

from archipelago.config import ConfigError


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (written to state_dir/address)
    state_dir: str = "runs/coordinator"
    metrics_port: int = 0  # Prometheus endpoint; 0 disables it
    # Membership
    lease_ttl_s: float = 10.0
    islands_file: str = ""  # JSON {island_id: token}; empty: open registration (local runs only)
    admin_credential: str = ""  # empty: admin RPCs refused
    # Rounds
    quorum: float = 1.0  # fraction of live islands a round waits for
    round_deadline_s: float = 0.0  # close a round after this long with >= min_islands; 0: wait
    min_islands: int = 1
    staleness_limit: int = 4  # refuse pushes whose base version is more versions old than this
    staleness_discount: float = 0.5  # weight factor per version of staleness
    # Outer optimizer: Nesterov SGD on the fp32 master copy (DiLoCo, arXiv:2311.08105: lr 0.7, 0.9)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    broadcast_scheme: str = "int8-block"  # how outer deltas travel back to islands
    # Payloads
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 20
    max_payload_bytes: int = 4 << 30
    max_update_norm: float = 0.0  # 0: no bound on a pushed pseudo-gradient's norm
    # Persistence
    checkpoint_every: int = 1  # versions between global checkpoints
    keep_checkpoints: int = 3
    delta_log: int = 64  # outer deltas kept for islands that pull incrementally

    def __post_init__(self) -> None:
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"coordinator.quorum must be in (0, 1], got {self.quorum}")
        if self.lease_ttl_s <= 0:
            raise ConfigError(f"coordinator.lease_ttl_s must be positive, got {self.lease_ttl_s}")
        if self.chunk_bytes <= 0 or self.chunk_bytes > self.max_message_bytes - 4096:
            raise ConfigError("coordinator.chunk_bytes must be positive and fit in max_message_bytes "
                              f"(chunk_bytes={self.chunk_bytes}, max_message_bytes={self.max_message_bytes})")
        if self.outer_lr <= 0 or not 0 <= self.outer_momentum < 1:
            raise ConfigError("coordinator.outer_lr must be > 0 and outer_momentum in [0, 1)")
