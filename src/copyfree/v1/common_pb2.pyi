from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CollectionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLLECTION_KIND_UNSPECIFIED: _ClassVar[CollectionKind]
    COLLECTION_KIND_REGISTRY: _ClassVar[CollectionKind]
    COLLECTION_KIND_COPYRIGHT_FREE: _ClassVar[CollectionKind]
COLLECTION_KIND_UNSPECIFIED: CollectionKind
COLLECTION_KIND_REGISTRY: CollectionKind
COLLECTION_KIND_COPYRIGHT_FREE: CollectionKind

class WorkMetadata(_message.Message):
    __slots__ = ("title", "owner", "licence", "source")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    title: str
    owner: str
    licence: str
    source: str
    def __init__(self, title: _Optional[str] = ..., owner: _Optional[str] = ..., licence: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class DetectionKeys(_message.Message):
    __slots__ = ("first_key", "second_key", "background")
    FIRST_KEY_FIELD_NUMBER: _ClassVar[int]
    SECOND_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    first_key: bytes
    second_key: bytes
    background: float
    def __init__(self, first_key: _Optional[bytes] = ..., second_key: _Optional[bytes] = ..., background: _Optional[float] = ...) -> None: ...

class RetrievalCode(_message.Message):
    __slots__ = ("code", "code_bits", "fine")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_BITS_FIELD_NUMBER: _ClassVar[int]
    FINE_FIELD_NUMBER: _ClassVar[int]
    code: bytes
    code_bits: int
    fine: bytes
    def __init__(self, code: _Optional[bytes] = ..., code_bits: _Optional[int] = ..., fine: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("max_hamming", "min_cosine", "fallback_k", "require_second_key", "trimmed_view", "background_weight")
    MAX_HAMMING_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_K_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SECOND_KEY_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_VIEW_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    max_hamming: int
    min_cosine: float
    fallback_k: int
    require_second_key: bool
    trimmed_view: bool
    background_weight: float
    def __init__(self, max_hamming: _Optional[int] = ..., min_cosine: _Optional[float] = ..., fallback_k: _Optional[int] = ..., require_second_key: _Optional[bool] = ..., trimmed_view: _Optional[bool] = ..., background_weight: _Optional[float] = ...) -> None: ...
