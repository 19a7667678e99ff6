from copyfree.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IndexItem(_message.Message):
    __slots__ = ("id", "metadata", "keys", "code")
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata: _common_pb2.WorkMetadata
    keys: _common_pb2.DetectionKeys
    code: _common_pb2.RetrievalCode
    def __init__(self, id: _Optional[str] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ..., keys: _Optional[_Union[_common_pb2.DetectionKeys, _Mapping]] = ..., code: _Optional[_Union[_common_pb2.RetrievalCode, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "kind", "model", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    kind: _common_pb2.CollectionKind
    model: _common_pb2.ModelRef
    items: _containers.RepeatedCompositeFieldContainer[IndexItem]
    def __init__(self, collection: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.CollectionKind, str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., items: _Optional[_Iterable[_Union[IndexItem, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "replaced")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    replaced: int
    def __init__(self, upserted: _Optional[int] = ..., replaced: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing_ids")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., missing_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("collection", "model", "query", "max_hamming", "fallback_k", "max_candidates")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MAX_HAMMING_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_K_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model: _common_pb2.ModelRef
    query: _common_pb2.DetectionKeys
    max_hamming: int
    fallback_k: int
    max_candidates: int
    def __init__(self, collection: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., query: _Optional[_Union[_common_pb2.DetectionKeys, _Mapping]] = ..., max_hamming: _Optional[int] = ..., fallback_k: _Optional[int] = ..., max_candidates: _Optional[int] = ...) -> None: ...

class DetectCandidate(_message.Message):
    __slots__ = ("id", "hamming", "cosine", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    hamming: int
    cosine: float
    metadata: _common_pb2.WorkMetadata
    def __init__(self, id: _Optional[str] = ..., hamming: _Optional[int] = ..., cosine: _Optional[float] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("candidates", "stage1_count", "nearest", "shard_id", "searched")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STAGE1_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[DetectCandidate]
    stage1_count: int
    nearest: _containers.RepeatedCompositeFieldContainer[DetectCandidate]
    shard_id: int
    searched: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[DetectCandidate, _Mapping]]] = ..., stage1_count: _Optional[int] = ..., nearest: _Optional[_Iterable[_Union[DetectCandidate, _Mapping]]] = ..., shard_id: _Optional[int] = ..., searched: _Optional[int] = ...) -> None: ...

class SimilarRequest(_message.Message):
    __slots__ = ("collection", "model", "query", "top_n")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model: _common_pb2.ModelRef
    query: _common_pb2.RetrievalCode
    top_n: int
    def __init__(self, collection: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., query: _Optional[_Union[_common_pb2.RetrievalCode, _Mapping]] = ..., top_n: _Optional[int] = ...) -> None: ...

class SimilarHit(_message.Message):
    __slots__ = ("id", "hamming", "fine_cosine", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    HAMMING_FIELD_NUMBER: _ClassVar[int]
    FINE_COSINE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    hamming: int
    fine_cosine: float
    metadata: _common_pb2.WorkMetadata
    def __init__(self, id: _Optional[str] = ..., hamming: _Optional[int] = ..., fine_cosine: _Optional[float] = ..., metadata: _Optional[_Union[_common_pb2.WorkMetadata, _Mapping]] = ...) -> None: ...

class SimilarResponse(_message.Message):
    __slots__ = ("hits", "shard_id", "searched")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SimilarHit]
    shard_id: int
    searched: int
    def __init__(self, hits: _Optional[_Iterable[_Union[SimilarHit, _Mapping]]] = ..., shard_id: _Optional[int] = ..., searched: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "kind", "model", "items", "tombstones", "memory_bytes", "code_bits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODE_BITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _common_pb2.CollectionKind
    model: _common_pb2.ModelRef
    items: int
    tombstones: int
    memory_bytes: int
    code_bits: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.CollectionKind, str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., items: _Optional[int] = ..., tombstones: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., code_bits: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "ready", "collections")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    ready: bool
    collections: _containers.RepeatedCompositeFieldContainer[CollectionStats]
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., ready: _Optional[bool] = ..., collections: _Optional[_Iterable[_Union[CollectionStats, _Mapping]]] = ...) -> None: ...
