from copyfree.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODE_OUTPUT_UNSPECIFIED: _ClassVar[EncodeOutput]
    ENCODE_OUTPUT_DETECTION: _ClassVar[EncodeOutput]
    ENCODE_OUTPUT_RETRIEVAL: _ClassVar[EncodeOutput]
    ENCODE_OUTPUT_DETECTION_TRIMMED: _ClassVar[EncodeOutput]
ENCODE_OUTPUT_UNSPECIFIED: EncodeOutput
ENCODE_OUTPUT_DETECTION: EncodeOutput
ENCODE_OUTPUT_RETRIEVAL: EncodeOutput
ENCODE_OUTPUT_DETECTION_TRIMMED: EncodeOutput

class EncodeRequest(_message.Message):
    __slots__ = ("image", "outputs")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    outputs: _containers.RepeatedScalarFieldContainer[EncodeOutput]
    def __init__(self, image: _Optional[bytes] = ..., outputs: _Optional[_Iterable[_Union[EncodeOutput, str]]] = ...) -> None: ...

class Encoding(_message.Message):
    __slots__ = ("detection", "embedding", "retrieval", "detection_model", "retrieval_model", "width", "height", "trimmed_detection")
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    DETECTION_MODEL_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_DETECTION_FIELD_NUMBER: _ClassVar[int]
    detection: _common_pb2.DetectionKeys
    embedding: _containers.RepeatedScalarFieldContainer[float]
    retrieval: _common_pb2.RetrievalCode
    detection_model: _common_pb2.ModelRef
    retrieval_model: _common_pb2.ModelRef
    width: int
    height: int
    trimmed_detection: _common_pb2.DetectionKeys
    def __init__(self, detection: _Optional[_Union[_common_pb2.DetectionKeys, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ..., retrieval: _Optional[_Union[_common_pb2.RetrievalCode, _Mapping]] = ..., detection_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., retrieval_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., trimmed_detection: _Optional[_Union[_common_pb2.DetectionKeys, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("encoding",)
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    def __init__(self, encoding: _Optional[_Union[Encoding, _Mapping]] = ...) -> None: ...

class EncodeBatchRequest(_message.Message):
    __slots__ = ("images", "outputs")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    outputs: _containers.RepeatedScalarFieldContainer[EncodeOutput]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., outputs: _Optional[_Iterable[_Union[EncodeOutput, str]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("encoding", "error")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    error: ItemError
    def __init__(self, encoding: _Optional[_Union[Encoding, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class EncodeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("model", "kind", "code_bits", "fine_dim", "thresholds", "manifest_json", "execution_provider")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CODE_BITS_FIELD_NUMBER: _ClassVar[int]
    FINE_DIM_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    kind: str
    code_bits: int
    fine_dim: int
    thresholds: _common_pb2.Thresholds
    manifest_json: str
    execution_provider: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., kind: _Optional[str] = ..., code_bits: _Optional[int] = ..., fine_dim: _Optional[int] = ..., thresholds: _Optional[_Union[_common_pb2.Thresholds, _Mapping]] = ..., manifest_json: _Optional[str] = ..., execution_provider: _Optional[str] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDescription]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDescription, _Mapping]]] = ...) -> None: ...
