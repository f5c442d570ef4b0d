from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]

class LogitsForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGITS_FORM_FULL: _ClassVar[LogitsForm]
    LOGITS_FORM_COMPACT: _ClassVar[LogitsForm]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
LOGITS_FORM_FULL: LogitsForm
LOGITS_FORM_COMPACT: LogitsForm

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("channels", "input_size", "mean", "std", "dtype")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    channels: int
    input_size: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    dtype: DType
    def __init__(self, channels: _Optional[int] = ..., input_size: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Tap(_message.Message):
    __slots__ = ("name", "channels", "height", "width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    channels: int
    height: int
    width: int
    def __init__(self, name: _Optional[str] = ..., channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "architecture", "num_classes", "identity", "weights_sha256", "input", "taps", "output_dtypes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TAPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    num_classes: int
    identity: str
    weights_sha256: str
    input: InputSpec
    taps: _containers.RepeatedCompositeFieldContainer[Tap]
    output_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_classes: _Optional[int] = ..., identity: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., taps: _Optional[_Iterable[_Union[Tap, _Mapping]]] = ..., output_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ...) -> None: ...

class ListTeachersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTeachersResponse(_message.Message):
    __slots__ = ("teachers", "max_batch_size", "max_message_bytes")
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    max_batch_size: int
    max_message_bytes: int
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("teachers", "outputs", "output_dtype", "top_k", "images", "chunk_size", "request_id", "logits_form", "bypass_cache", "expected_identities")
    class ExpectedIdentitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FORM_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedScalarFieldContainer[str]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: DType
    top_k: int
    images: Tensor
    chunk_size: int
    request_id: str
    logits_form: LogitsForm
    bypass_cache: bool
    expected_identities: _containers.ScalarMap[str, str]
    def __init__(self, teachers: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., chunk_size: _Optional[int] = ..., request_id: _Optional[str] = ..., logits_form: _Optional[_Union[LogitsForm, str]] = ..., bypass_cache: _Optional[bool] = ..., expected_identities: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("values", "indices")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    indices: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("teacher", "start", "count", "outputs", "logits_top_k", "cached", "compact_logits")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_TOP_K_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    COMPACT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    start: int
    count: int
    outputs: _containers.MessageMap[str, Tensor]
    logits_top_k: TopK
    cached: _containers.RepeatedScalarFieldContainer[bool]
    compact_logits: Tensor
    def __init__(self, teacher: _Optional[str] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., logits_top_k: _Optional[_Union[TopK, _Mapping]] = ..., cached: _Optional[_Iterable[bool]] = ..., compact_logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
