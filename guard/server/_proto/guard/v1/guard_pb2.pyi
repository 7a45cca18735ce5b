from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("model", "shape", "data")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, model: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "flagged", "score", "model_label", "logits")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LABEL_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    label: int
    flagged: bool
    score: float
    model_label: int
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., flagged: _Optional[bool] = ..., score: _Optional[float] = ..., model_label: _Optional[int] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "policy", "predictions", "unchecked")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    UNCHECKED_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    unchecked: bool
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., unchecked: _Optional[bool] = ...) -> None: ...
