"""The Open Inference Protocol (KServe v2) wire format, including Triton's binary tensor extension.

Knows nothing of models: it turns request bodies into named numpy arrays and arrays into response
bodies, and raises InvalidInput on anything malformed. The kinds of ProtocolError (InvalidInput, NotFound,
Unavailable...) are every failure the server answers, whatever the transport; HTTP_STATUS, the protocol's
HTTP binding, is their one mapping to HTTP statuses (grpc_service.GRPC_CODES to gRPC's). Decoding and encoding
run in worker threads (app.py, grpc_service.py): no step here holds the GIL for more than a slice of SLICE
values, so the event loop keeps answering meanwhile. BodyBudget bounds the bytes of bodies held at once,
whatever the transport.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import orjson

from yatdeploy.serving.datatypes import DATATYPES, datatype_of

HEADER_LENGTH = "Inference-Header-Content-Length"
# Non-finite floating-point values in JSON `data`, which has no literal for them (both ways).
NONFINITE_SPELLINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INT64_MAX = 2**63 - 1
# Large tensors are checked, converted and serialized this many values at a time: a parse or an encoding in a
# worker thread then lets the event loop have the GIL between slices instead of holding it for a whole tensor.
SLICE = 1 << 16
_U32 = struct.Struct("<I")
# A request body (or gRPC message) larger than this is decoded in a worker thread, and an answer whose tensors
# are larger encoded in one; smaller ones are not worth the trip.
INLINE_BYTES = 64 << 10
_JSON_TYPE_NAMES = {type(None): "null", bool: "boolean", int: "integer", float: "non-integer number", str: "string",
                    dict: "object", list: "list"}


class ProtocolError(Exception):
    """A request answered with an error instead of outputs: its kind (the subclass) and the message the client
    reads. Raise a kind, never this class."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ProtocolError):
    """The request is malformed or does not fit the model (or the server's mode)."""


class NotFound(ProtocolError):
    """No such model or version."""


class ResourceExhausted(ProtocolError):
    """The request is larger than a limit allows (its body, its JSON)."""


class UnsupportedMediaType(ProtocolError):
    """The body comes in an encoding the server does not read."""


class AlreadyExists(ProtocolError):
    """The name asked for is taken (a shared-memory region's)."""


class Unavailable(ProtocolError):
    """Not now: the model is not ready or was unloaded, its queue is full, the server holds too many bodies."""


class DeadlineExceeded(ProtocolError):
    """The request's timeout expired before it was answered."""


class Internal(ProtocolError):
    """The server failed (the model's run, or a bug of ours)."""


# The one mapping of the kinds to HTTP statuses: the v2 protocol's HTTP binding, what the HTTP app answers and
# what the access log records for a request over either transport.
HTTP_STATUS: dict[type[ProtocolError], int] = {
    InvalidInput: 400, AlreadyExists: 400, NotFound: 404, ResourceExhausted: 413, UnsupportedMediaType: 415, Internal: 500,
    Unavailable: 503, DeadlineExceeded: 504,
}


@dataclass(frozen=True)
class SharedTensor:
    """Where a tensor lies in a registered shared-memory region (the shared-memory extension's parameters): its
    `byte_size` bytes from `offset` within the region."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0  # the classification extension: send the top class_count classes instead
    shared: SharedTensor | None = None  # written into this shared memory instead of sent


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    input_datatypes: dict[str, str]
    # None: every output of the model, with binary_default saying how to send them.
    outputs: list[RequestedOutput] | None = None
    binary_default: bool = False
    parameters: dict = field(default_factory=dict)
    timeout_us: int = 0  # the request's `timeout` parameter, microseconds; 0: none
    priority: int = 0  # the request's `priority` parameter; 0: the model's default level (queue_policy)
    # Inputs to read from shared memory (their shapes and where they lie), put into `inputs` by the server.
    shared_inputs: dict[str, tuple[tuple[int, ...], SharedTensor]] = field(default_factory=dict)

    def reference_bytes(self) -> int:
        """What its BYTES tensors hold besides their text, a reference per element (counted in the body budget)."""
        return sum(8 * array.size for array in self.inputs.values() if array.dtype == object)


def tensor_shape(raw: object, name: str) -> tuple[int, ...]:
    """An input's shape as sent: a list of non-negative integers of at most 2**63-1 elements in all."""
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if any(d > _INT64_MAX for d in raw) or math.prod(raw) > _INT64_MAX:
        raise InvalidInput(f"input '{name}': shape {raw} has more elements than a tensor can hold")
    return tuple(raw)


def _types(values: list) -> set[type]:
    kinds: set[type] = set()
    for start in range(0, len(values), SLICE):
        kinds.update(map(type, values[start:start + SLICE]))
    return kinds


def _converted(values: list, dtype: np.dtype) -> np.ndarray:
    array = np.empty(len(values), dtype)
    for start in range(0, len(values), SLICE):
        array[start:start + SLICE] = values[start:start + SLICE]
    return array


def _values(data: object, shape: tuple[int, ...], name: str) -> tuple[list, set[type]]:
    """The elements of `data` in row-major order, and their Python types. `data` is flat, or nested exactly
    as `shape` says (as many levels as dimensions, each list as long as its dimension)."""
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list")
    kinds = _types(data)
    if list not in kinds:
        return data, kinds
    level = [data]
    for depth, size in enumerate(shape):
        below: list = []
        for item in level:
            if type(item) is not list or len(item) != size:
                raise InvalidInput(f"input '{name}': nested 'data' does not match shape {list(shape)} "
                                   f"(dimension {depth})")
            below.extend(item)
        level = below
    kinds = _types(level)
    if list in kinds:
        raise InvalidInput(f"input '{name}': 'data' is nested deeper than shape {list(shape)}")
    return level, kinds


def _array(data: object, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    """JSON `data` as an array of `datatype`: numbers (or NONFINITE_SPELLINGS) for FP*, integers in range for
    INT*/UINT*, booleans for BOOL; an InvalidInput naming the first mismatch otherwise."""
    dtype = DATATYPES[datatype]
    values, kinds = _values(data, shape, name)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': {len(values)} values for shape {list(shape)} ({count} expected)")
    if datatype == BYTES:
        if kinds - {str}:
            names = ", ".join(sorted(_JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds - {str}))
            raise InvalidInput(f"input '{name}': BYTES data holds {names} values (strings expected)")
        return string_tensor(values, shape)
    allowed = {bool} if datatype == "BOOL" else {int} if dtype.kind in "iu" else {int, float, str}
    wrong = kinds - allowed
    if wrong:
        names = ", ".join(sorted(_JSON_TYPE_NAMES.get(k, k.__name__) for k in wrong))
        raise InvalidInput(f"input '{name}': {datatype} data holds {names} values")
    if str in kinds:
        unknown = {v for v in values if type(v) is str} - NONFINITE_SPELLINGS.keys()
        if unknown:
            raise InvalidInput(f"input '{name}': {datatype} data holds the string {min(unknown)!r}; the only strings "
                               f"allowed are {', '.join(map(repr, NONFINITE_SPELLINGS))}")
        values = [NONFINITE_SPELLINGS[v] if type(v) is str else v for v in values]
    check_int_range(values, datatype, name)
    if dtype.kind in "biu":
        return _converted(values, dtype).reshape(shape)
    try:
        wide = _converted(values, np.dtype(np.float64))
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value is out of {datatype}'s range") from None
    with np.errstate(over="ignore"):
        array = wide.astype(dtype)
    if np.count_nonzero(np.isinf(array)) != np.count_nonzero(np.isinf(wide)):
        raise InvalidInput(f"input '{name}': a value is out of {datatype}'s range")
    return array.reshape(shape)


def check_int_range(values: list, datatype: str, name: str) -> None:
    """InvalidInput when an integer datatype's values (Python ints) do not all fit it."""
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values:
        limits = np.iinfo(dtype)
        slices = [values[start:start + SLICE] for start in range(0, len(values), SLICE)]
        if min(map(min, slices)) < limits.min or max(map(max, slices)) > limits.max:
            raise InvalidInput(f"input '{name}': a value is out of {datatype}'s range [{limits.min}, {limits.max}]")


def check_binary_size(size: int, datatype: str, shape: tuple[int, ...], name: str, described: str) -> None:
    """InvalidInput when `size` binary bytes are not what `shape` of `datatype` takes (BYTES: any size; its elements are
    counted when read). `described`: what sent that size, for the message."""
    if datatype != BYTES and size != (needed := math.prod(shape) * DATATYPES[datatype].itemsize):
        raise InvalidInput(f"input '{name}': {described}, shape {list(shape)} of {datatype} needs {needed}")


def _flag(parameters: dict, key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise InvalidInput(f"{where}: '{key}' must be true or false, not {orjson.dumps(value).decode()[:40]}")
    return value


def _parameters(raw: dict, where: str) -> dict:
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return parameters


SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


def shared_tensor(parameters: dict, where: str) -> SharedTensor | None:
    """A tensor's place in shared memory from its parameters (the same over HTTP and gRPC); None when it names no
    region. InvalidInput for a region without a byte size, or sizes that are not byte counts."""
    if SHM_REGION not in parameters:
        for key in (SHM_BYTE_SIZE, SHM_OFFSET):
            if key in parameters:
                raise InvalidInput(f"{where}: '{key}' is given without '{SHM_REGION}'")
        return None
    region = parameters[SHM_REGION]
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{where}: '{SHM_REGION}' must be a region's name")
    if SHM_BYTE_SIZE not in parameters:
        raise InvalidInput(f"{where}: '{SHM_REGION}' needs '{SHM_BYTE_SIZE}'")
    sizes = [parameters[SHM_BYTE_SIZE], parameters.get(SHM_OFFSET, 0)]
    for key, value in zip((SHM_BYTE_SIZE, SHM_OFFSET), sizes):
        if type(value) is not int or value < 0 or value > _INT64_MAX:
            raise InvalidInput(f"{where}: '{key}' must be a number of bytes >= 0, not "
                               f"{orjson.dumps(value, default=str).decode()[:40]}")
    return SharedTensor(region, sizes[0], sizes[1])


def json_object(text: bytes | memoryview) -> dict:
    """A request's JSON, which must be an object; InvalidInput otherwise."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the request must be a JSON object")
    return value


def json_length(body: bytes, header_length: str | None) -> int:
    """The length of the body's JSON part: all of it, or what Inference-Header-Content-Length says."""
    if header_length is None:
        return len(body)
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
    if length < 0 or length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    return length


def parse_request(body: bytes, header_length: str | None, max_json_bytes: int | None = None) -> InferRequest:
    """Split the body at the JSON header's length (binary extension) and decode every input.

    Raises InvalidInput for anything malformed, ResourceExhausted for a JSON part over `max_json_bytes`."""
    json_size = json_length(body, header_length)
    if max_json_bytes is not None and json_size > max_json_bytes:
        raise ResourceExhausted(f"the request's JSON of {json_size} bytes exceeds the JSON limit of "
                                f"{max_json_bytes} bytes (send large tensors as binary data)")
    header = json_object(body[:json_size])
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request has no 'inputs' list")
    request_id = header.get("id")
    if "id" in header and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")

    binary = memoryview(body)[json_size:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    shared_inputs: dict[str, tuple[tuple[int, ...], SharedTensor]] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput("every input needs a 'name'")
        name = raw["name"]
        if name in inputs or name in shared_inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            raise InvalidInput(f"input '{name}': unsupported datatype {datatype!r}")
        shape = tensor_shape(raw.get("shape"), name)
        parameters_in = _parameters(raw, f"input '{name}'")
        size = parameters_in.get("binary_data_size")
        shared = shared_tensor(parameters_in, f"input '{name}'")
        if shared is not None:
            if "data" in raw or size is not None:
                raise InvalidInput(f"input '{name}' must give one of 'data', 'binary_data_size' and "
                                   f"'{SHM_REGION}', not several")
            check_binary_size(shared.byte_size, datatype, shape, name, f"{SHM_BYTE_SIZE} is {shared.byte_size} bytes")
            shared_inputs[name] = (shape, shared)
            datatypes[name] = datatype
            continue
        if size is not None:
            if "data" in raw:
                raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size")
            if type(size) is not int or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            check_binary_size(size, datatype, shape, name, f"binary_data_size is {size} bytes")
            if offset + size > len(binary):
                raise InvalidInput(f"input '{name}': the body ends after {len(binary) - offset} of its {size} "
                                   "binary bytes")
            array = tensor_from_bytes(binary[offset:offset + size], datatype, shape, name)
            offset += size
        else:
            if "data" not in raw:
                raise InvalidInput(f"input '{name}' has neither 'data' nor binary_data_size")
            array = _array(raw["data"], shape, datatype, name)
        inputs[name] = array
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes beyond the inputs' binary data")

    outputs = None
    raw_outputs = header.get("outputs")
    parameters = _parameters(header, "the request")
    binary_default = _flag(parameters, "binary_data_output", False, "the request's parameters")
    refuse_scheduling(parameters)
    timeout = check_timeout(parameters.get("timeout", 0))
    priority = check_priority(parameters.get("priority", 0))
    if "outputs" in header:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidInput("every requested output needs a 'name'")
            where = f"output '{raw['name']}'"
            if any(o.name == raw["name"] for o in outputs):
                raise InvalidInput(f"{where} is requested twice")
            parameters_out = _parameters(raw, where)
            # As Triton: binary_data_output is the default of the outputs not named; a named one is JSON unless
            # its own binary_data says otherwise.
            outputs.append(requested_output(raw["name"], _flag(parameters_out, "binary_data", False, where),
                                            parameters_out))
    return InferRequest(
        id=request_id,
        inputs=inputs,
        input_datatypes=datatypes,
        outputs=outputs,
        binary_default=binary_default,
        parameters=parameters,
        timeout_us=timeout,
        priority=priority,
        shared_inputs=shared_inputs,
    )


def requested_output(name: str, binary: bool, parameters: dict) -> RequestedOutput:
    """An output asked for, with its parameters (classification, shared memory); InvalidInput for a shared-memory
    output also asked to be classified or sent as binary (as Triton refuses them)."""
    where = f"output '{name}'"
    count = class_count(parameters.get("classification", 0), where)
    shared = shared_tensor(parameters, where)
    if shared is not None and (count or parameters.get("binary_data") is True):
        raise InvalidInput(f"{where} can't be both written to shared memory and "
                           + ("classified" if count else "sent as binary data"))
    return RequestedOutput(name, binary, count, shared)


def class_count(value: object, where: str) -> int:
    """A requested output's `classification` parameter (the number of top classes to send; 0: the output)."""
    if type(value) is not int or value < 0:
        raise InvalidInput(f"{where}: 'classification' must be a number of classes >= 0, not "
                           f"{orjson.dumps(value).decode()[:40]}")
    return value


def check_timeout(value: object) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInput(f"the request's 'timeout' parameter must be a number of microseconds >= 0, not {value!r}")
    return value


def check_priority(value: object) -> int:
    """A request's `priority` parameter: an integer >= 0 (whether the model has that level: queue_policy)."""
    if type(value) is not int or value < 0:
        raise InvalidInput(f"the request's 'priority' parameter must be a priority level >= 0 (0: the model's "
                           f"default), not {value!r}")
    return value


def parse_raw_request(body: bytes, name: str, datatype: str, dims: tuple[int, ...],
                      batched: bool = False) -> InferRequest:
    """Triton's raw binary request (Inference-Header-Content-Length: 0): the whole body is the tensor of a
    model's only input, `name` of `datatype`, whose shape is its `dims` with the one free dimension (-1) deduced
    from the body's size; BYTES: the body is one element. `batched`: the first of `dims` is a batch dimension,
    which is 1 when another dimension is free (as Triton makes it), else deduced."""
    if batched and any(d < 0 for d in dims[1:]):
        dims = (1, *dims[1:])
    free = [i for i, d in enumerate(dims) if d < 0]
    if datatype == BYTES:
        shape = tuple(1 if d < 0 else d for d in dims)
        if math.prod(shape) != 1:
            raise InvalidInput(f"a raw binary request is one BYTES element; input '{name}' has shape {list(dims)}")
        try:
            array = string_tensor([bytes(body).decode("utf-8")], shape)
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{name}': the raw BYTES body is not UTF-8 text") from None
    else:
        itemsize = DATATYPES[datatype].itemsize
        fixed = math.prod(d for d in dims if d >= 0)
        if len(free) > 1:
            raise InvalidInput(f"a raw binary request's shape can't be deduced: input '{name}' has {len(free)} free "
                               f"dimensions {list(dims)} (send a JSON header with the shape)")
        if fixed == 0 or len(body) % (fixed * itemsize) or (not free and len(body) != fixed * itemsize):
            raise InvalidInput(f"a raw binary request of {len(body)} bytes does not fit input '{name}': {datatype} "
                               f"of shape {list(dims)}")
        shape = tuple(len(body) // (fixed * itemsize) if d < 0 else d for d in dims)
        array = tensor_from_bytes(body, datatype, shape, name)
    # Triton answers a raw request with binary outputs: the client sent no JSON and may read none.
    return InferRequest(id=None, inputs={name: array}, input_datatypes={name: datatype}, binary_default=True)


# Request parameters of Triton schedulers yatdeploy does not have, with their "not asked for" values.
_SCHEDULING = {
    "sequence_id": ((0, ""), "sequence batching (stateful models)"),
    "sequence_start": ((False,), "sequence batching (stateful models)"),
    "sequence_end": ((False,), "sequence batching (stateful models)"),
}


def refuse_scheduling(parameters: dict) -> None:
    """InvalidInput for a parameter that asks for scheduling yatdeploy does not do, rather than ignoring it."""
    for name, (unset, what) in _SCHEDULING.items():
        if name in parameters and parameters[name] not in unset:
            raise InvalidInput(f"the request's '{name}' parameter asks for {what}, which yatdeploy's models do "
                               "not support")


BYTES = "BYTES"


def tensor_from_bytes(data: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from its binary form (little-endian, row-major; BYTES length-prefixed), whose size has been
    checked against `shape` (for BYTES: the element count is checked here)."""
    try:
        if datatype == BYTES:
            return _length_prefixed(data, math.prod(shape), name).reshape(shape)
        return np.frombuffer(data, dtype=DATATYPES[datatype]).reshape(shape)
    except ValueError as exc:  # an empty tensor with a dimension numpy cannot index
        raise InvalidInput(f"input '{name}': shape {list(shape)}: {exc}") from None


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor's binary form, as tensor_from_bytes reads it."""
    return _length_prefix(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()


def string_tensor(values: list, shape: tuple[int, ...]) -> np.ndarray:
    """An object array of str of `shape` (ONNX Runtime's form of a string tensor)."""
    return _converted(values, np.dtype(object)).reshape(shape)


def _length_prefixed(data: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """BYTES in Triton's binary form: each element a 4-byte little-endian length, then its bytes (UTF-8); a flat
    object array of str."""
    same = _same_length_text(data, count)
    if same is not None:
        return same
    view = memoryview(data)
    unpack = _U32.unpack_from
    values: list[str] = []
    append = values.append
    offset, size = 0, len(view)
    try:
        while offset < size:
            (length,) = unpack(view, offset)
            start = offset + 4
            offset = start + length
            if offset > size:
                raise InvalidInput(f"input '{name}': BYTES element {len(values)} claims {length} bytes, "
                                   f"{size - start} follow")
            append(str(view[start:offset], "utf-8"))
    except struct.error:
        raise InvalidInput(f"input '{name}': BYTES element {len(values)} has a truncated length") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': BYTES element {len(values)} is not UTF-8 text") from None
    if len(values) != count:
        raise InvalidInput(f"input '{name}': {len(values)} BYTES elements for {count} in its shape")
    return _converted(values, np.dtype(object))


def _same_length_text(data: bytes | memoryview, count: int) -> np.ndarray | None:
    """The `count` elements at once, when they all have the same length and hold ASCII text without NUL: the
    binary form is then a table numpy reads whole (16 million empty strings: no loop over them). None otherwise,
    malformed data included (read element by element, which says what is wrong)."""
    if count == 0 or len(data) < 4:
        return None
    length = _U32.unpack_from(data)[0]
    if len(data) != count * (4 + length):
        return None
    lengths = np.ndarray((count,), np.dtype("<u4"), data, strides=(4 + length,))
    if lengths.min() != length or lengths.max() != length:
        return None
    array = np.empty(count, dtype=object)
    if length == 0:
        for start in range(0, count, SLICE):
            array[start:start + SLICE] = ""
        return array
    text = np.frombuffer(data, np.uint8).reshape(count, 4 + length)[:, 4:]
    for start in range(0, count, SLICE):
        rows = text[start:start + SLICE]
        if rows.min() == 0 or rows.max() >= 0x80:
            return None
        # ASCII without NUL: numpy's fixed-width strings hold it exactly (they drop trailing NULs only).
        array[start:start + SLICE] = np.ascontiguousarray(rows).view(f"S{length}").ravel().astype(f"U{length}")
    return array


def _length_prefix(array: np.ndarray) -> bytes:
    """The binary form of a BYTES tensor (str elements as UTF-8), built SLICE elements at a time: the lengths
    and the text are interleaved by numpy, not element by element, and ASCII text is encoded a slice at once."""
    flat = array.ravel()
    parts = []
    for start in range(0, flat.size, SLICE):
        values = flat[start:start + SLICE].tolist()
        try:
            joined = "".join(values)
        except TypeError:  # bytes among them
            joined = None
        if joined is not None and joined.isascii():  # then each element's UTF-8 is as long as the element
            text, lengths = joined.encode("ascii"), np.fromiter(map(len, values), np.int64, len(values))
        else:
            raws = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
            text, lengths = b"".join(raws), np.fromiter(map(len, raws), np.int64, len(raws))
        out = np.empty(4 * len(values) + len(text), np.uint8)
        heads = 4 * np.arange(len(values)) + np.cumsum(lengths) - lengths  # where each element's length goes
        slots = (heads[:, None] + np.arange(4)).ravel()
        out[slots] = lengths.astype("<u4").view(np.uint8)
        content = np.ones(out.size, bool)
        content[slots] = False
        out[content] = np.frombuffer(text, np.uint8)
        parts.append(out)
    return b"".join(parts)


def _json_data(array: np.ndarray) -> list:
    """An output's values for JSON `data`: non-finite floats as NONFINITE_SPELLINGS (JSON has no literal for
    them; numpy, hence tritonclient's as_numpy, parses these strings back)."""
    if array.dtype == object:  # strings (bytes from a model are sent as UTF-8 text, undecodable bytes replaced)
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel().tolist()]
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
        return array.ravel().tolist()
    values = array.astype(np.float64, copy=False).ravel()
    if np.isfinite(values).all():
        return values.tolist()
    return [v if math.isfinite(v) else "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"
            for v in values.tolist()]


def _json_text(array: np.ndarray) -> bytes:
    """An output's `data` as JSON text, serialized SLICE values at a time."""
    flat = array.ravel()
    slices = [orjson.dumps(_json_data(flat[start:start + SLICE]))[1:-1] for start in range(0, flat.size, SLICE)]
    return b"[" + b",".join(slices) + b"]"


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]],
    shared: dict[str, dict] | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None). `shared`: the
    outputs written into shared memory, each with the parameters that say where (sent instead of its data)."""
    entries = []
    blobs = []
    for name, array, binary in outputs:
        entry: dict = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if shared and name in shared:
            entry["parameters"] = shared[name]
            entries.append(orjson.dumps(entry))
        elif binary:
            blob = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
            entries.append(orjson.dumps(entry))
        else:  # the data's JSON written a slice at a time, then put in its place
            entries.append(orjson.dumps(entry)[:-1] + b',"data":' + _json_text(array) + b"}")
    response: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response)[:-1] + b',"outputs":[' + b",".join(entries) + b"]}"
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


class BodyBudget:
    """The bytes of request bodies the server holds at once, over both transports: bodies being read (counted as
    they arrive, or at once from their Content-Length), decompressed (as they inflate), decoded (a BYTES tensor's
    object array), and answers, until each answer is sent. A request that would pass `limit` is refused at once
    (Unavailable: HTTP 503, gRPC UNAVAILABLE, as Triton answers a full queue), unless it is the only one holding
    any: a lone request always goes on, whatever the limit. Thread-safe (decompression runs in a worker thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._holders = 0  # claims holding bytes
        self._lock = threading.Lock()

    def claim(self) -> BodyClaim:
        return BodyClaim(self)


class BodyClaim:
    """One request's share of a BodyBudget: add() as what it holds grows, release() once it is answered."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def add(self, size: int, *, refuse: bool = True) -> None:
        """Count `size` more bytes; Unavailable when they would pass the limit (`refuse`: False counts
        them anyway, for an answer already computed)."""
        budget = self.budget
        with budget._lock:
            alone = budget._holders == (1 if self.bytes else 0)
            if refuse and not alone and budget.held + size > budget.limit:
                raise Unavailable(f"the server is overloaded: the request bodies in flight would exceed its "
                                  f"limit of {budget.limit} bytes; try again later")
            if size and not self.bytes:
                budget._holders += 1
            budget.held += size
            self.bytes += size

    def release(self, size: int | None = None) -> None:
        """Give back `size` bytes (None: all; again after all: nothing)."""
        budget = self.budget
        with budget._lock:
            size = self.bytes if size is None else min(size, self.bytes)
            budget.held -= size
            self.bytes -= size
            if size and not self.bytes:
                budget._holders -= 1
