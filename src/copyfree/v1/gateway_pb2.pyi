from copyfree.v1 import common_pb2 as _common_pb2
from copyfree.v1 import encoder_pb2 as _encoder_pb2
from copyfree.v1 import index_pb2 as _index_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_REGISTERED: _ClassVar[Verdict]
    VERDICT_UNVERIFIED: _ClassVar[Verdict]

class DecisionStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_STAGE_UNSPECIFIED: _ClassVar[DecisionStage]
    DECISION_STAGE_UNIQUE_FIRST_KEY: _ClassVar[DecisionStage]
    DECISION_STAGE_SECOND_KEY: _ClassVar[DecisionStage]
    DECISION_STAGE_FALLBACK: _ClassVar[DecisionStage]
    DECISION_STAGE_NO_CANDIDATE: _ClassVar[DecisionStage]
VERDICT_UNSPECIFIED: Verdict
VERDICT_REGISTERED: Verdict
VERDICT_UNVERIFIED: Verdict
DECISION_STAGE_UNSPECIFIED: DecisionStage
DECISION_STAGE_UNIQUE_FIRST_KEY: DecisionStage
DECISION_STAGE_SECOND_KEY: DecisionStage
DECISION_STAGE_FALLBACK: DecisionStage
DECISION_STAGE_NO_CANDIDATE: DecisionStage

class CheckRequest(_message.Message):
    __slots__ = ("image", "top_n", "registry", "copyright_free", "max_hamming", "min_cosine", "fallback_k", "require_second_key", "background_weight")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    COPYRIGHT_FREE_FIELD_NUMBER: _ClassVar[int]
    MAX_HAMMING_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_K_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SECOND_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_n: int
    registry: str
    copyright_free: str
    max_hamming: int
    min_cosine: float
    fallback_k: int
    require_second_key: bool
    background_weight: float
    def __init__(self, image: _Optional[bytes] = ..., top_n: _Optional[int] = ..., registry: _Optional[str] = ..., copyright_free: _Optional[str] = ..., max_hamming: _Optional[int] = ..., min_cosine: _Optional[float] = ..., fallback_k: _Optional[int] = ..., require_second_key: _Optional[bool] = ..., background_weight: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "hamming", "cosine")
    ID_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    id: str
    hamming: int
    cosine: float
    def __init__(self, id: _Optional[str] = ..., hamming: _Optional[int] = ..., cosine: _Optional[float] = ...) -> None: ...

class DetectionEvidence(_message.Message):
    __slots__ = ("stage", "stage1_candidates", "stage2_candidates", "thresholds", "top_candidates", "model", "searched", "shards", "trimmed", "background")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE1_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STAGE2_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    TOP_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    stage: DecisionStage
    stage1_candidates: int
    stage2_candidates: int
    thresholds: _common_pb2.Thresholds
    top_candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model: _common_pb2.ModelRef
    searched: int
    shards: int
    trimmed: bool
    background: float
    def __init__(self, stage: _Optional[_Union[DecisionStage, str]] = ..., stage1_candidates: _Optional[int] = ..., stage2_candidates: _Optional[int] = ..., thresholds: _Optional[_Union[_common_pb2.Thresholds, _Mapping]] = ..., top_candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., searched: _Optional[int] = ..., shards: _Optional[int] = ..., trimmed: _Optional[bool] = ..., background: _Optional[float] = ...) -> None: ...

class RegisteredMatch(_message.Message):
    __slots__ = ("collection", "id", "metadata", "hamming", "cosine")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    metadata: _common_pb2.WorkMetadata
    hamming: int
    cosine: float
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ..., hamming: _Optional[int] = ..., cosine: _Optional[float] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("collection", "id", "metadata", "hamming", "fine_cosine", "rank")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    FINE_COSINE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    metadata: _common_pb2.WorkMetadata
    hamming: int
    fine_cosine: float
    rank: int
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ..., hamming: _Optional[int] = ..., fine_cosine: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("verdict", "match", "recommendations", "evidence", "retrieval_model", "request_id")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    match: RegisteredMatch
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    evidence: DetectionEvidence
    retrieval_model: _common_pb2.ModelRef
    request_id: str
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., match: _Optional[_Union[RegisteredMatch, _Mapping]] = ..., recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., evidence: _Optional[_Union[DetectionEvidence, _Mapping]] = ..., retrieval_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("collection", "kind", "id", "image", "metadata")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    collection: str
    kind: _common_pb2.CollectionKind
    id: str
    image: bytes
    metadata: _common_pb2.WorkMetadata
    def __init__(self, collection: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.CollectionKind, str]] = ..., id: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ...) -> None: ...

class RegisterFailure(_message.Message):
    __slots__ = ("id", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: str
    message: str
    def __init__(self, id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("collection", "registered", "replaced", "failures", "model")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    registered: int
    replaced: int
    failures: _containers.RepeatedCompositeFieldContainer[RegisterFailure]
    model: _common_pb2.ModelRef
    def __init__(self, collection: _Optional[str] = ..., registered: _Optional[int] = ..., replaced: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[RegisterFailure, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("image", "top_n", "copyright_free")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    COPYRIGHT_FREE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_n: int
    copyright_free: str
    def __init__(self, image: _Optional[bytes] = ..., top_n: _Optional[int] = ..., copyright_free: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("recommendations", "retrieval_model", "request_id")
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    retrieval_model: _common_pb2.ModelRef
    request_id: str
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., retrieval_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GatewayDeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GatewayDeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing_ids")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., missing_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GatewayStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GatewayStatsResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[_index_pb2.StatsResponse]
    def __init__(self, shards: _Optional[_Iterable[_Union[_index_pb2.StatsResponse, _Mapping]]] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit", "before", "since_unix_ms", "caller")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before: str
    since_unix_ms: int
    caller: str
    def __init__(self, limit: _Optional[int] = ..., before: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., caller: _Optional[str] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "time_unix_ms", "request_id", "caller", "status", "verdict", "collection", "matched_id", "hamming", "cosine", "evidence", "detection_model", "retrieval_model", "recommended_ids", "image_sha256", "image_bytes", "duration_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MATCHED_ID_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    DETECTION_MODEL_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    time_unix_ms: int
    request_id: str
    caller: str
    status: str
    verdict: Verdict
    collection: str
    matched_id: str
    hamming: int
    cosine: float
    evidence: DetectionEvidence
    detection_model: _common_pb2.ModelRef
    retrieval_model: _common_pb2.ModelRef
    recommended_ids: _containers.RepeatedScalarFieldContainer[str]
    image_sha256: str
    image_bytes: int
    duration_ms: float
    def __init__(self, id: _Optional[str] = ..., time_unix_ms: _Optional[int] = ..., request_id: _Optional[str] = ..., caller: _Optional[str] = ..., status: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., collection: _Optional[str] = ..., matched_id: _Optional[str] = ..., hamming: _Optional[int] = ..., cosine: _Optional[float] = ..., evidence: _Optional[_Union[DetectionEvidence, _Mapping]] = ..., detection_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., retrieval_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., recommended_ids: _Optional[_Iterable[str]] = ..., image_sha256: _Optional[str] = ..., image_bytes: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries", "next_cursor")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_cursor: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...
