"""The Open Inference Protocol (KServe v2) wire format, including Triton's binary tensor extension.

Knows nothing of models: it turns request bodies into named numpy arrays and arrays into response
bodies, and raises ProtocolError (an HTTP status and a message) on anything malformed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import orjson

from yatdeploy.serving.datatypes import DATATYPES, datatype_of

HEADER_LENGTH = "Inference-Header-Content-Length"

class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    input_datatypes: dict[str, str]
    # None: every output of the model, with binary_default saying how to send them.
    outputs: list[RequestedOutput] | None = None
    binary_default: bool = False
    parameters: dict = field(default_factory=dict)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def _shape(raw: object, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(f"input '{name}': 'shape' must be a list of non-negative integers")
    return tuple(raw)


def _flatten(data: object) -> list:
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split the body at the JSON header's length (binary extension) and decode every input."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if json_length < 0 or json_length > len(body):
            raise _bad(f"{HEADER_LENGTH} is {json_length} but the body has {len(body)} bytes")
    else:
        json_length = len(body)
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise _bad(f"malformed JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("the request must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("the request has no 'inputs' list")

    binary = memoryview(body)[json_length:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _bad("every input needs a 'name'")
        name = raw["name"]
        if name in inputs:
            raise _bad(f"input '{name}' is given twice")
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            raise _bad(f"input '{name}': unsupported datatype {datatype!r}")
        shape = _shape(raw.get("shape"), name)
        dtype = DATATYPES[datatype]
        count = int(np.prod(shape, dtype=np.int64))
        params = raw.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if "data" in raw:
                raise _bad(f"input '{name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or size < 0:
                raise _bad(f"input '{name}': binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise _bad(f"input '{name}': binary_data_size is {size} bytes, shape {list(shape)} of {datatype} "
                           f"needs {count * dtype.itemsize}")
            if offset + size > len(binary):
                raise _bad(f"input '{name}': the body ends after {len(binary) - offset} of its {size} binary bytes")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in raw:
                raise _bad(f"input '{name}' has neither 'data' nor binary_data_size")
            flat = _flatten(raw["data"])
            if len(flat) != count:
                raise _bad(f"input '{name}': {len(flat)} values for shape {list(shape)} ({count} expected)")
            try:
                array = np.asarray(flat, dtype=np.float64 if dtype.kind == "V" else dtype).astype(dtype).reshape(shape)
            except (TypeError, ValueError, OverflowError):
                raise _bad(f"input '{name}': 'data' holds values that are not {datatype}") from None
        inputs[name] = array
        datatypes[name] = datatype
    if offset != len(binary):
        raise _bad(f"the body has {len(binary) - offset} bytes beyond the inputs' binary data")

    outputs = None
    raw_outputs = header.get("outputs")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("'parameters' must be an object")
    binary_default = bool(parameters.get("binary_data_output", False))
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise _bad("'outputs' must be a list")
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise _bad("every requested output needs a 'name'")
            params = raw.get("parameters") or {}
            outputs.append(RequestedOutput(raw["name"], bool(params.get("binary_data", binary_default))))
    request_id = header.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        input_datatypes=datatypes,
        outputs=outputs,
        binary_default=binary_default,
        parameters=parameters,
    )


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: list[tuple[str, np.ndarray, bool]]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    entries = []
    blobs = []
    for name, array, binary in outputs:
        entry: dict = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == ml_dtypes.bfloat16:
            entry["data"] = array.astype(np.float32).ravel().tolist()
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
