"""The coordinator's typed config: the `[coordinator]` table of a preset."""

from __future__ import annotations

from dataclasses import dataclass, field

from archipelago.config import ConfigError
from protos.quant import ChunkTopK, CodecError, get_scheme

AGGREGATIONS = ("mean", "trimmed_mean")


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (written to state_dir/address)
    state_dir: str = "runs/coordinator"
    metrics_port: int = 0  # Prometheus endpoint; 0 disables it
    # Transport security: PEM files (`archipelago coordinator certs` writes a set). With a cert and
    # key the server speaks TLS; with a CA as well every client must present a certificate it
    # signed (mutual TLS). Without them the server is plaintext, which a non-loopback host allows
    # only with insecure = true; either way it logs a warning.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    insecure: bool = False
    # Membership
    lease_ttl_s: float = 10.0
    islands_file: str = ""  # JSON {island_id: token}; empty: open registration (local runs only)
    admin_credential: str = ""  # empty: admin RPCs refused
    # Rounds
    quorum: float = 1.0  # fraction of live islands a round waits for
    round_deadline_s: float = 0.0  # close a round this long after its first push (>= min_islands); 0: wait
    min_islands: int = 1
    staleness_limit: int = 4  # refuse pushes whose base version is more versions old than this
    staleness_discount: float = 0.5  # weight factor per version of staleness
    # Outer optimizer: Nesterov SGD on the fp32 master copy (DiLoCo, arXiv:2311.08105: lr 0.7, 0.9)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    # How outer deltas travel back to islands. A sparse scheme (sparse-{k}of{chunk}-{bits}bit,
    # protos/sparse.py) needs an update that is itself sparse: the mean of the islands' sparse pushes
    # with no outer momentum (docs/design.md step 9); its k per chunk should hold the union of the
    # islands' k (islands × their k), so the update's support fits.
    broadcast_scheme: str = "int8-block"
    # Payloads
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 8 << 20
    max_payload_bytes: int = 4 << 30
    max_update_norm: float = 0.0  # 0: no bound on a pushed pseudo-gradient's norm
    # What a push may claim (docs/design.md step 6). tokens: at most max_tokens_per_push (0: only
    # the hard bound of 2**53; `archipelago sim` sets it to 4 × the tokens of an island's longest
    # round); an island's tokens count for at most token_cap_factor × the round's lower median
    # (0: no cap), so one island that over-reports cannot outweigh the others.
    max_tokens_per_push: int = 0
    token_cap_factor: float = 2.0
    # Concurrent push streams the coordinator receives, in all and from one island; beyond them a
    # push is refused with RESOURCE_EXHAUSTED (and retried by the island). A body is never held in
    # memory, so each stream costs about one chunk.
    max_push_streams: int = 128
    max_push_streams_per_island: int = 4
    # Robust aggregation (coordinator/aggregate.py). Both off by default: the weighted mean.
    # clip_update_norm = c > 0 scales each contribution down to norm at most c × the median of the
    # fragment's recent update norms (the last `clip_window` accepted ones, this round's included).
    clip_update_norm: float = 0.0
    clip_window: int = 64
    # "trimmed_mean": per coordinate, drop the floor(trim_fraction × n) smallest and largest values
    # and take the weighted mean of the rest; used when a round has >= 4 contributions.
    aggregation: str = "mean"
    trim_fraction: float = 0.25
    # Persistence
    checkpoint_every: int = 1  # versions between global checkpoints
    keep_checkpoints: int = 3
    delta_log: int = 64  # outer deltas kept for islands that pull incrementally
    # Divergence guard (coordinator/guard.py). A round whose outer step is non-finite, whose step
    # norm exceeds guard_norm_factor × the median of recent committed ones, or whose reported loss
    # exceeds guard_loss_factor × the median of recent committed rounds' is not committed;
    # guard_max_refusals refused rounds in a row roll back to the newest older checkpoint.
    # A factor of 0 turns its check off; guard_max_refusals = 0 never rolls back.
    guard_norm_factor: float = 10.0
    guard_loss_factor: float = 1.5
    guard_window: int = 16
    guard_min_history: int = 3
    guard_max_refusals: int = 3
    # Standby coordinators (coordinator/etcd.py): with etcd = "HOST:PORT", coordinators sharing
    # state_dir (a shared folder) elect a leader through an etcd lease; the state store lives in
    # etcd, every write fenced by the leader's epoch. Empty: one coordinator, sqlite in state_dir.
    etcd: str = ""
    etcd_prefix: str = "/archipelago/run"
    etcd_lease_ttl_s: int = 5
    # Sharding by fragment (docs/design.md, "Sharded coordinator"): shard i of num_shards owns the
    # fragments f with f % num_shards == i and is an ordinary coordinator process (its own state
    # directory, store, checkpoints and, with etcd, its own election under etcd_prefix/shard-i).
    # `shards` lists every shard's address in shard order (islands take them joined by ";", each
    # shard's failover addresses joined by ","); empty: one unsharded coordinator. When `shards`
    # is given and num_shards is left at 1, num_shards is its length.
    shards: list[str] = field(default_factory=list)
    num_shards: int = 1
    shard_index: int = 0

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
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("coordinator.tls_cert and coordinator.tls_key go together: give both or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("coordinator.tls_ca needs coordinator.tls_cert and tls_key (the server's own "
                              "certificate) as well")
        if self.insecure and self.tls_cert:
            raise ConfigError("coordinator.insecure contradicts coordinator.tls_cert: serve with TLS or "
                              "without it, not both")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"coordinator.aggregation must be one of {list(AGGREGATIONS)}, "
                              f"got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"coordinator.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if min(self.guard_norm_factor, self.guard_loss_factor) < 0 or self.guard_window < 1 \
                or self.guard_min_history < 1 or self.guard_max_refusals < 0:
            raise ConfigError("coordinator.guard_norm_factor and guard_loss_factor must be >= 0 (0: off), "
                              "guard_window and guard_min_history >= 1, guard_max_refusals >= 0")
        if self.guard_min_history > self.guard_window:
            raise ConfigError(f"coordinator.guard_min_history ({self.guard_min_history}) cannot exceed "
                              f"guard_window ({self.guard_window})")
        if self.etcd and (":" not in self.etcd or self.etcd_lease_ttl_s < 2):
            raise ConfigError(f"coordinator.etcd must be HOST:PORT (got {self.etcd!r}) and etcd_lease_ttl_s "
                              f">= 2 (etcd's smallest lease), got {self.etcd_lease_ttl_s}")
        self._check_shards()
        if self.max_tokens_per_push < 0 or not (self.token_cap_factor == 0 or self.token_cap_factor >= 1):
            raise ConfigError("coordinator.max_tokens_per_push must be >= 0 (0: no bound) and token_cap_factor 0 "
                              f"(off) or >= 1, got {self.max_tokens_per_push} and {self.token_cap_factor}")
        if self.max_push_streams < 1 or not 1 <= self.max_push_streams_per_island <= self.max_push_streams:
            raise ConfigError("coordinator.max_push_streams must be >= 1 and max_push_streams_per_island in "
                              f"[1, max_push_streams], got {self.max_push_streams} and "
                              f"{self.max_push_streams_per_island}")
        try:
            scheme = get_scheme(self.broadcast_scheme)
        except CodecError as exc:
            raise ConfigError(f"coordinator.broadcast_scheme: {exc}") from None
        if isinstance(scheme, ChunkTopK) and (self.outer_momentum > 0 or self.aggregation != "mean"):
            raise ConfigError(f"coordinator.broadcast_scheme = {self.broadcast_scheme!r} sends the outer update as a "
                              "sparse union, which it is only without outer momentum and with the plain mean: set "
                              f"coordinator.outer_momentum = 0 (is {self.outer_momentum}) and aggregation = \"mean\" "
                              f"(is {self.aggregation!r}), or broadcast a dense scheme")
        if self.clip_update_norm < 0 or self.clip_window < 1:
            raise ConfigError("coordinator.clip_update_norm must be >= 0 (0: off) and clip_window >= 1, got "
                              f"{self.clip_update_norm} and {self.clip_window}")

    def _check_shards(self) -> None:
        if any(not isinstance(a, str) or not a.strip() or ";" in a for a in self.shards):
            raise ConfigError(f"coordinator.shards must list one address group per shard (HOST:PORT, a "
                              f"shard's failover addresses joined by ','), got {self.shards!r}")
        if self.shards and self.num_shards == 1:
            self.num_shards = len(self.shards)
        if self.num_shards < 1:
            raise ConfigError(f"coordinator.num_shards must be >= 1, got {self.num_shards}")
        if self.shards and len(self.shards) != self.num_shards:
            raise ConfigError(f"coordinator.shards lists {len(self.shards)} shard addresses but "
                              f"coordinator.num_shards is {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"coordinator.shard_index must be in [0, num_shards = {self.num_shards}), "
                              f"got {self.shard_index}")

    def check_fragments(self, num_fragments: int) -> None:
        """The run's fragment count is known (the initial model): every shard must own one."""
        if self.num_shards > num_fragments:
            raise ConfigError(f"coordinator.num_shards ({self.num_shards}) is above the run's fragment count "
                              f"({num_fragments}): a shard owns whole fragments, so a run of {num_fragments} "
                              f"fragment(s) has at most {num_fragments} shard(s) (set diloco.fragments)")

    def owner(self, fragment: int) -> int:
        """The shard that owns `fragment`."""
        return fragment % self.num_shards

    def owned_fragments(self, num_fragments: int) -> list[int]:
        """The fragments this shard owns (all of them when unsharded)."""
        return [f for f in range(num_fragments) if self.owner(f) == self.shard_index]

    @property
    def shard_etcd_prefix(self) -> str:
        """This shard's etcd key space: its own election and store, apart from the other shards'."""
        return f"{self.etcd_prefix}/shard-{self.shard_index}" if self.num_shards > 1 else self.etcd_prefix
