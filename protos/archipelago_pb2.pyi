from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("island_id", "token", "config_hash")
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    island_id: str
    token: str
    config_hash: str
    def __init__(self, island_id: _Optional[str] = ..., token: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("lease_id", "lease_ttl_s", "epoch", "version", "fragments", "broadcast_scheme", "staleness_limit", "theta_b_sha256", "timeline", "received_pushes", "num_shards", "shard_index")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_SCHEME_FIELD_NUMBER: _ClassVar[int]
    STALENESS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    THETA_B_SHA256_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_PUSHES_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_ttl_s: float
    epoch: int
    version: int
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentState]
    broadcast_scheme: str
    staleness_limit: int
    theta_b_sha256: str
    timeline: int
    received_pushes: int
    num_shards: int
    shard_index: int
    def __init__(self, lease_id: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ..., fragments: _Optional[_Iterable[_Union[FragmentState, _Mapping]]] = ..., broadcast_scheme: _Optional[str] = ..., staleness_limit: _Optional[int] = ..., theta_b_sha256: _Optional[str] = ..., timeline: _Optional[int] = ..., received_pushes: _Optional[int] = ..., num_shards: _Optional[int] = ..., shard_index: _Optional[int] = ...) -> None: ...

class FragmentState(_message.Message):
    __slots__ = ("fragment", "round", "version")
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    fragment: int
    round: int
    version: int
    def __init__(self, fragment: _Optional[int] = ..., round: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("island_id", "lease_id", "epoch")
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    island_id: str
    lease_id: str
    epoch: int
    def __init__(self, island_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("version", "fragments", "reload", "timeline")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    version: int
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentState]
    reload: bool
    timeline: int
    def __init__(self, version: _Optional[int] = ..., fragments: _Optional[_Iterable[_Union[FragmentState, _Mapping]]] = ..., reload: _Optional[bool] = ..., timeline: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("lease", "full", "since_version")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    full: bool
    since_version: int
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., full: _Optional[bool] = ..., since_version: _Optional[int] = ...) -> None: ...

class PayloadPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PayloadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("version", "fragment", "full", "codec_header", "body_len", "body_sha256", "num_chunks", "timeline")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    CODEC_HEADER_FIELD_NUMBER: _ClassVar[int]
    BODY_LEN_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    version: int
    fragment: int
    full: bool
    codec_header: bytes
    body_len: int
    body_sha256: str
    num_chunks: int
    timeline: int
    def __init__(self, version: _Optional[int] = ..., fragment: _Optional[int] = ..., full: _Optional[bool] = ..., codec_header: _Optional[bytes] = ..., body_len: _Optional[int] = ..., body_sha256: _Optional[str] = ..., num_chunks: _Optional[int] = ..., timeline: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data", "crc32")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    crc32: int
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("lease", "fragment", "round", "base_version", "tokens", "loss_mean", "eval_loss", "scheme", "codec_header", "body_len", "body_sha256", "num_chunks", "compute_s", "timeline", "codec_header_crc32", "last")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MEAN_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    CODEC_HEADER_FIELD_NUMBER: _ClassVar[int]
    BODY_LEN_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    CODEC_HEADER_CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    fragment: int
    round: int
    base_version: int
    tokens: int
    loss_mean: float
    eval_loss: float
    scheme: str
    codec_header: bytes
    body_len: int
    body_sha256: str
    num_chunks: int
    compute_s: float
    timeline: int
    codec_header_crc32: int
    last: bool
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., fragment: _Optional[int] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., tokens: _Optional[int] = ..., loss_mean: _Optional[float] = ..., eval_loss: _Optional[float] = ..., scheme: _Optional[str] = ..., codec_header: _Optional[bytes] = ..., body_len: _Optional[int] = ..., body_sha256: _Optional[str] = ..., num_chunks: _Optional[int] = ..., compute_s: _Optional[float] = ..., timeline: _Optional[int] = ..., codec_header_crc32: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class PushPart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "round", "version", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    version: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., version: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "version", "fragment", "round", "message", "timeline")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[Event.Kind]
        COMMITTED: _ClassVar[Event.Kind]
        ROLLBACK: _ClassVar[Event.Kind]
        SKIPPED: _ClassVar[Event.Kind]
        SHUTDOWN: _ClassVar[Event.Kind]
    UNKNOWN: Event.Kind
    COMMITTED: Event.Kind
    ROLLBACK: Event.Kind
    SKIPPED: Event.Kind
    SHUTDOWN: Event.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    kind: Event.Kind
    version: int
    fragment: int
    round: int
    message: str
    timeline: int
    def __init__(self, kind: _Optional[_Union[Event.Kind, str]] = ..., version: _Optional[int] = ..., fragment: _Optional[int] = ..., round: _Optional[int] = ..., message: _Optional[str] = ..., timeline: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("island_id", "token")
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    island_id: str
    token: str
    def __init__(self, island_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class IslandStatus(_message.Message):
    __slots__ = ("island_id", "epoch", "state", "last_seen_s", "pushes", "bytes_in", "bytes_out")
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    island_id: str
    epoch: int
    state: str
    last_seen_s: float
    pushes: int
    bytes_in: int
    bytes_out: int
    def __init__(self, island_id: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[str] = ..., last_seen_s: _Optional[float] = ..., pushes: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "fragments", "islands", "json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    ISLANDS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentState]
    islands: _containers.RepeatedCompositeFieldContainer[IslandStatus]
    json: str
    def __init__(self, version: _Optional[int] = ..., fragments: _Optional[_Iterable[_Union[FragmentState, _Mapping]]] = ..., islands: _Optional[_Iterable[_Union[IslandStatus, _Mapping]]] = ..., json: _Optional[str] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("credential",)
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    credential: str
    def __init__(self, credential: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("credential", "island_id")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    credential: str
    island_id: str
    def __init__(self, credential: _Optional[str] = ..., island_id: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("credential", "to_version")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    credential: str
    to_version: int
    def __init__(self, credential: _Optional[str] = ..., to_version: _Optional[int] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("ok", "message", "version")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    version: int
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
