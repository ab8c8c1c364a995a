"""The Open Inference Protocol over gRPC (Triton's GRPCInferenceService), on the same InferenceServer as HTTP.

The messages and the service stubs are those tritonclient[grpc] ships (tritonclient.grpc.service_pb2 and
service_pb2_grpc), so the wire format is Triton's own. Tensors come as raw_input_contents (what tritonclient
sends) or typed InferTensorContents; outputs always go back as raw_output_contents, as Triton sends them.
Failures are the InferenceServer's ProtocolErrors, each kind given the gRPC status code Triton gives the same
error (GRPC_CODES, the one mapping).
A large request is decoded, and a large answer encoded, in worker threads, off the event loop; each message
counts in the body budget HTTP shares (UNAVAILABLE past it, as Triton answers a full queue).
LogSettings and TraceSetting are serving.tracing's settings, as HTTP's /v2/logging and /v2/trace/setting. The
shared-memory calls are serving.shared_memory's, as HTTP's /v2/systemsharedmemory and /v2/cudasharedmemory; an
input in shared memory has no raw_input_contents entry, an output written there an empty one (as Triton's).

ModelStreamInfer streams a decoder export's generation as Triton streams a decoupled model's responses: a request
of a decoder whose only input is `text_input` (BYTES) or `input_ids` (INT64/INT32), with the sampling parameters as
request parameters (GENERATION_PARAMETERS), gets one response per generated token (`text_output`, `token_id`; the
last one also `finish_reason`), each with the `triton_final_response` parameter, true on the last. Any other
request (a raw decoder's v2 inputs too) is answered once, as Triton answers a non-decoupled model's. A call that
ends (the client cancels or goes away) cancels its generations: their sequences leave the batch with their cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from yatdeploy.serving.core import Deployed, InferenceServer, InferResult, access_log, off_loop_when
from yatdeploy.serving.datatypes import DATATYPES, datatype_of
from yatdeploy.serving.generation import GenerationEngine, SamplingParams, TokenEvent
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import (
    BYTES,
    HTTP_STATUS,
    INLINE_BYTES,
    SLICE,
    AlreadyExists,
    BodyBudget,
    BodyClaim,
    DeadlineExceeded,
    InferRequest,
    Internal,
    InvalidInput,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    SharedTensor,
    Unavailable,
    UnsupportedMediaType,
    check_binary_size,
    check_int_range,
    check_priority,
    check_timeout,
    refuse_scheduling,
    requested_output,
    shared_tensor,
    tensor_bytes,
    tensor_from_bytes,
    tensor_shape,
)

log = logging.getLogger("yatdeploy.serving")

# The one mapping of the kinds of ProtocolError to gRPC status codes: the code Triton answers for that failure.
GRPC_CODES: dict[type[ProtocolError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT, AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED, UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    Internal: grpc.StatusCode.INTERNAL, Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# InferTensorContents' field for each datatype that has one (FP16 and BF16 travel only as raw contents).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", BYTES: "bytes_contents"}


async def _abort(context, error: ProtocolError) -> None:
    """End the call with `error`'s message and the gRPC code Triton gives that kind of failure."""
    await context.abort(GRPC_CODES[type(error)], error.message)


def _parameter(value: service_pb2.InferParameter) -> object:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which is not None else None


def _parameters(entries) -> dict:
    return {key: _parameter(value) for key, value in entries.items()}


def _typed_contents(tensor, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """An input sent in InferTensorContents' typed field for its datatype, read SLICE values at a time (from a
    worker thread, the event loop has the GIL between slices)."""
    name = tensor.name
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must be sent as raw_input_contents")
    contents = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(contents) != count:
        raise InvalidInput(f"input '{name}': {len(contents)} values in {field} for shape {list(shape)} ({count} "
                           "expected)")
    array = np.empty(count, dtype=DATATYPES[datatype])
    for start in range(0, count, SLICE):
        values = contents[start:start + SLICE]
        if datatype == BYTES:
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{name}': a BYTES element is not UTF-8 text") from None
        else:
            check_int_range(values, datatype, name)
        array[start:start + SLICE] = values
    return array.reshape(shape)


def _message_bytes(message: service_pb2.ModelInferRequest) -> int:
    """About what a request message holds: its raw tensors, and 8 bytes a typed value."""
    typed = sum(len(getattr(t.contents, _CONTENTS[t.datatype])) for t in message.inputs
                if t.HasField("contents") and t.datatype in _CONTENTS)
    return sum(map(len, message.raw_input_contents)) + 8 * typed


def _infer_response(result: InferResult) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=result.model.name, model_version=result.model.version,
                                              id=result.request.id or "")
    for name, array, _ in result.outputs:
        output = response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
        shared = result.shared.get(name)
        if shared is not None:
            output.parameters["shared_memory_region"].string_param = shared["shared_memory_region"]
            output.parameters["shared_memory_byte_size"].int64_param = shared["shared_memory_byte_size"]
            if "shared_memory_offset" in shared:
                output.parameters["shared_memory_offset"].int64_param = shared["shared_memory_offset"]
        response.raw_output_contents.append(b"" if shared is not None else tensor_bytes(array))
    return response


def infer_request(message: service_pb2.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the InferenceServer's request; InvalidInput naming what is malformed."""
    parameters = _parameters(message.parameters)
    refuse_scheduling(parameters)
    timeout = check_timeout(parameters.get("timeout", 0))
    priority = check_priority(parameters.get("priority", 0))
    raw = message.raw_input_contents
    places = [shared_tensor(_parameters(tensor.parameters), f"input '{tensor.name}'") for tensor in message.inputs]
    sent = len(message.inputs) - len(places) + places.count(None)  # the inputs not in shared memory
    if raw and len(raw) != sent:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {sent} inputs (send every input raw, or "
                           "none; none for an input in shared memory)")
    if not message.inputs:
        raise InvalidInput("the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    shared_inputs: dict[str, tuple[tuple[int, ...], SharedTensor]] = {}
    index = -1  # the raw entry of the input read last
    for tensor, place in zip(message.inputs, places):
        name = tensor.name
        if not name:
            raise InvalidInput("every input needs a name")
        if name in inputs or name in shared_inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        if tensor.datatype not in DATATYPES:
            raise InvalidInput(f"input '{name}': unsupported datatype {tensor.datatype!r}")
        shape = tensor_shape(list(tensor.shape), name)
        datatypes[name] = tensor.datatype
        if place is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{name}' has both contents and a shared memory region")
            check_binary_size(place.byte_size, tensor.datatype, shape, name,
                              f"shared_memory_byte_size is {place.byte_size} bytes")
            shared_inputs[name] = (shape, place)
            continue
        index += 1
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{name}' has both contents and raw_input_contents")
            blob = raw[index]
            check_binary_size(len(blob), tensor.datatype, shape, name, f"raw_input_contents has {len(blob)} bytes")
            inputs[name] = tensor_from_bytes(blob, tensor.datatype, shape, name)
        else:
            inputs[name] = _typed_contents(tensor, tensor.datatype, shape)
    outputs = None
    names = [o.name for o in message.outputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"output '{next(n for n in names if names.count(n) > 1)}' is requested twice")
    if message.outputs:
        outputs = [requested_output(o.name, True, _parameters(o.parameters)) for o in message.outputs]
    return InferRequest(id=message.id or None, inputs=inputs, input_datatypes=datatypes, outputs=outputs,
                        binary_default=True, parameters=parameters, timeout_us=timeout,
                        priority=priority, shared_inputs=shared_inputs)


# A generation over ModelStreamInfer: its inputs (one of them), its outputs, Triton's flag of the last response.
TEXT_INPUT, IDS_INPUT = "text_input", "input_ids"
TEXT_OUTPUT, TOKEN_OUTPUT, FINISH_OUTPUT = "text_output", "token_id", "finish_reason"
FINAL_RESPONSE = "triton_final_response"
# The request parameters a generation takes (SamplingParams' fields), and Triton's own it accepts beside them.
GENERATION_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                         "ignore_eos")
_TRITON_PARAMETERS = frozenset({"timeout", "priority", "sequence_id", "sequence_start", "sequence_end",
                                "triton_enable_empty_final_response"})


def _asks_to_generate(message: service_pb2.ModelInferRequest) -> bool:
    """A request whose only input is a prompt (a raw decoder's requests have its mask and cache too)."""
    names = {tensor.name for tensor in message.inputs}
    return names == {TEXT_INPUT} or names == {IDS_INPUT}


def _integer(parameters: dict, name: str) -> int:
    value = parameters[name]
    if type(value) is not int:
        raise InvalidInput(f"parameter '{name}': a whole number, not {value!r}")
    return value


def _number(parameters: dict, name: str) -> float:
    value = parameters[name]
    if type(value) not in (int, float):
        raise InvalidInput(f"parameter '{name}': a number, not {value!r}")
    return float(value)


def _listed(parameters: dict, name: str, kind: type) -> tuple:
    """A parameter holding one value of `kind` or several: a JSON list of them in a string_param (InferParameter
    holds one scalar)."""
    value = parameters[name]
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            value = [value] if kind is str else None
    values = value if isinstance(value, list) else [value]
    if not all(type(v) is kind for v in values):
        raise InvalidInput(f"parameter '{name}': a {kind.__name__} or a JSON list of them, not {parameters[name]!r}")
    return tuple(values)


def sampling_params(parameters: dict) -> SamplingParams:
    """A stream request's parameters as the generation's SamplingParams (checked when submitted); InvalidInput
    for a parameter a generation does not take."""
    unknown = sorted(set(parameters) - set(GENERATION_PARAMETERS) - _TRITON_PARAMETERS)
    if unknown:
        raise InvalidInput(f"parameter '{unknown[0]}' is not one a generation takes "
                           f"({', '.join(GENERATION_PARAMETERS)})")
    fields: dict[str, object] = {}
    for name in ("max_tokens", "top_k", "seed"):
        if name in parameters:
            fields[name] = _integer(parameters, name)
    if fields.get("top_k") == -1:  # all, as vLLM spells it
        fields["top_k"] = 0
    for name in ("temperature", "top_p"):
        if name in parameters:
            fields[name] = _number(parameters, name)
    if "stop" in parameters:
        fields["stop"] = _listed(parameters, "stop", str)
    if "stop_token_ids" in parameters:
        fields["stop_token_ids"] = _listed(parameters, "stop_token_ids", int)
    if "ignore_eos" in parameters:
        if type(parameters["ignore_eos"]) is not bool:
            raise InvalidInput(f"parameter 'ignore_eos': true or false, not {parameters['ignore_eos']!r}")
        fields["ignore_eos"] = parameters["ignore_eos"]
    return SamplingParams(**fields)


def prompt_ids(request: InferRequest, engine: GenerationEngine) -> list[int]:
    """The prompt of a generating request: `text_input` encoded by the model's tokenizer, or `input_ids`."""
    (name, array), = request.inputs.items()
    datatype = request.input_datatypes[name]
    if name == TEXT_INPUT:
        if datatype != BYTES or array.size != 1:
            raise InvalidInput(f"input '{TEXT_INPUT}': one BYTES element (shape [1]), not {datatype} of shape "
                               f"{list(array.shape)}")
        if engine.codec is None:
            raise InvalidInput(f"model '{engine.name}' has no tokenizer beside its export: send the prompt's token "
                               f"ids as '{IDS_INPUT}'")
        text = array.reshape(-1)[0]
        return engine.codec.encode(text if isinstance(text, str) else bytes(text).decode("utf-8", "replace"))
    if datatype not in ("INT64", "INT32") or array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[0] != 1):
        raise InvalidInput(f"input '{IDS_INPUT}': INT64 or INT32 of shape [n] or [1, n], not {datatype} of shape "
                           f"{list(array.shape)}")
    return array.reshape(-1).tolist()


def _generation_outputs(message: service_pb2.ModelInferRequest) -> frozenset[str] | None:
    """The outputs a generating request asks for (None: all)."""
    if not message.outputs:
        return None
    names = [output.name for output in message.outputs]
    known = (TEXT_OUTPUT, TOKEN_OUTPUT, FINISH_OUTPUT)
    unknown = next((n for n in names if n not in known), None)
    if unknown is not None:
        raise InvalidInput(f"output '{unknown}': a generation's outputs are {', '.join(known)}")
    return frozenset(names)


def _token_response(deployed: Deployed, request_id: str, event: TokenEvent,
                    wanted: frozenset[str] | None) -> service_pb2.ModelStreamInferResponse:
    """One generated token as a decoupled model's response: flagged final when it ends the generation."""
    response = service_pb2.ModelInferResponse(model_name=deployed.model.name, model_version=deployed.model.version,
                                              id=request_id)
    tensors = [(TEXT_OUTPUT, np.array([event.text], dtype=object))]
    if event.token_id is not None:
        tensors.append((TOKEN_OUTPUT, np.array([event.token_id], np.int64)))
    if event.finish_reason is not None:
        tensors.append((FINISH_OUTPUT, np.array([event.finish_reason], dtype=object)))
    for name, array in tensors:
        if wanted is None or name in wanted:
            response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
            response.raw_output_contents.append(tensor_bytes(array))
    response.parameters[FINAL_RESPONSE].bool_param = event.finish_reason is not None
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _error_response(message: service_pb2.ModelInferRequest, error: ProtocolError,
                    final: bool | None = None) -> service_pb2.ModelStreamInferResponse:
    """A failed request in the stream, as Triton sends it: the error and the request's id, model and version;
    a failure of a request that had started also flagged final (None: a request that never started)."""
    response = service_pb2.ModelInferResponse(model_name=message.model_name, model_version=message.model_version,
                                              id=message.id)
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    return service_pb2.ModelStreamInferResponse(error_message=error.message, infer_response=response)


def _decoded(message: service_pb2.ModelInferRequest, claim: BodyClaim) -> InferRequest:
    request = infer_request(message)
    claim.add(request.reference_bytes())
    return request


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: InferenceServer, budget: BodyBudget) -> None:
        self.server = server
        self.budget = budget
        # As HTTP's: large messages decoded one at a time, large answers encoded in the other.
        self._parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-grpc-parse")
        self._answer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-grpc-answer")

    def close(self) -> None:
        """End the worker threads (once every call is answered)."""
        self._parse_pool.shutdown(wait=True)
        self._answer_pool.shutdown(wait=True)

    async def _answer(self, context, call):
        """`call()`'s result, or the call aborted with the gRPC code of its ProtocolError."""
        try:
            return call()
        except ProtocolError as exc:
            await _abort(context, exc)

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.server.is_ready())

    async def ModelReady(self, request, context):
        try:
            ready, _ = self.server.model_ready(request.name, request.version or None)
        except NotFound:
            ready = False  # an unknown model is not ready (HTTP answers 404 for the same)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.server.server_metadata())

    async def ModelMetadata(self, request, context):
        metadata = await self._answer(context, lambda: self.server.metadata(request.name, request.version or None))

        def tensors(entries: list[dict]) -> list:
            return [service_pb2.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"],
                                                                     shape=t["shape"]) for t in entries]

        return service_pb2.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                                 platform=metadata["platform"], inputs=tensors(metadata["inputs"]),
                                                 outputs=tensors(metadata["outputs"]))

    async def ModelConfig(self, request, context):
        config = await self._answer(context, lambda: self.server.config(request.name, request.version or None))
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request, context):
        stats = await self._answer(context, lambda: self.server.statistics(request.name or None,
                                                                           request.version or None))
        return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    async def SystemSharedMemoryStatus(self, request, context):
        regions = await self._answer(context, lambda: self.server.shared_memory.status(request.name or None))
        status = service_pb2.SystemSharedMemoryStatusResponse.RegionStatus
        return service_pb2.SystemSharedMemoryStatusResponse(regions={r["name"]: status(**r) for r in regions})

    async def SystemSharedMemoryRegister(self, request, context):
        await self._answer(context, lambda: self.server.shared_memory.register(request.name, request.key,
                                                                                request.offset, request.byte_size))
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.server.shared_memory.unregister(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        await self._answer(context, lambda: self.server.shared_memory.cuda_status(request.name or None))
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        await self._answer(context, lambda: self.server.shared_memory.cuda_register(request.name))

    async def CudaSharedMemoryUnregister(self, request, context):
        return service_pb2.CudaSharedMemoryUnregisterResponse()  # no CUDA region is ever registered (as Triton)

    async def RepositoryIndex(self, request, context):
        models = [service_pb2.RepositoryIndexResponse.ModelIndex(**entry) for entry in self.server.index(request.ready)]
        return service_pb2.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        parameters = request.parameters
        config = None
        if "config" in parameters:
            config = parameters["config"].string_param
        try:
            await self.server.load(request.model_name, config, [key for key in parameters if key.startswith("file:")])
        except ProtocolError as exc:
            await _abort(context, exc)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.server.unload(request.model_name)
        except ProtocolError as exc:
            await _abort(context, exc)
        return service_pb2.RepositoryModelUnloadResponse()

    async def LogSettings(self, request, context):
        """Triton's log settings: those the request sets (a value each), then all of them."""
        try:
            changes = {key: _parameter(value) for key, value in request.settings.items()}
            settings = self.server.log.update(changes) if changes else self.server.log.settings()
        except ProtocolError as exc:
            await _abort(context, exc)
        response = service_pb2.LogSettingsResponse()
        for key, value in settings.items():
            kind = {bool: "bool_param", int: "uint32_param"}.get(type(value), "string_param")
            setattr(response.settings[key], kind, value)
        return response

    async def TraceSetting(self, request, context):
        """Triton's trace settings, global or of request.model_name: those the request sets (no value: back to
        the global one), then all of them, each a list of strings."""
        name = request.model_name or None
        try:
            if name is not None:
                self.server.model_ready(name)  # NotFound for a model never heard of
            changes = {key: list(value.value) or None for key, value in request.settings.items()}
            # no settings: a get (gRPC has one call for both), never the removal HTTP's empty POST is
            settings = self.server.tracing.update(changes, name) if changes else self.server.tracing.settings(name)
        except ProtocolError as exc:
            await _abort(context, exc)
        response = service_pb2.TraceSettingResponse()
        for key, value in settings.items():
            response.settings[key].value.extend(value if isinstance(value, list) else [value])
        return response

    async def _infer(self, message: service_pb2.ModelInferRequest,
                     metadata: Callable[[], dict] = dict) -> service_pb2.ModelInferResponse:
        """One inference (the InferenceServer's, counted and logged, traced as the trace settings say with the
        traceparent of the call's `metadata()`); a ProtocolError when it fails."""
        trace = self.server.tracing.begin(message.model_name, message.model_version or None, metadata, "grpc")
        claim = self.budget.claim()  # until the answer is handed to gRPC
        try:
            answer = await self.server.infer(message.model_name, message.model_version or None,
                                             partial(self._decode, message, claim), trace.encoder(self._encode),
                                             request_id=message.id or None)
        except BaseException as exc:
            trace.end(exc)
            raise
        finally:
            claim.release()
        trace.end()
        return answer

    async def _decode(self, message: service_pb2.ModelInferRequest, claim: BodyClaim,
                      model: ServedModel) -> InferRequest:
        size = _message_bytes(message)
        claim.add(size)
        return await off_loop_when(size > INLINE_BYTES, self._parse_pool, _decoded, message, claim)

    async def _encode(self, result: InferResult) -> service_pb2.ModelInferResponse:
        return await off_loop_when(result.output_bytes() > INLINE_BYTES, self._answer_pool, _infer_response, result)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, lambda: dict(context.invocation_metadata()))
        except ProtocolError as exc:
            await _abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator:
        """Every request of the stream runs as it arrives (so that they can share batches); each response, or
        its error, goes back as soon as it is ready: a generation's tokens one by one, any other request's
        answer once (flagged final, as Triton flags a non-decoupled model's). A call that ends cancels what it
        still runs."""
        answers: asyncio.Queue = asyncio.Queue()
        done = object()

        async def one(message) -> None:
            try:
                if _asks_to_generate(message):
                    deployed = self.server.deployed(message.model_name, message.model_version or None)
                    if deployed.generator is not None:
                        await self._generate(message, deployed, answers.put)
                        return
                    if TEXT_INPUT not in {i.name for i in deployed.model.inputs}:
                        self.server.generator(message.model_name, message.model_version or None)  # says why not
                response = await self._infer(message, lambda: dict(context.invocation_metadata()))
                response.parameters[FINAL_RESPONSE].bool_param = True
                answer = service_pb2.ModelStreamInferResponse(infer_response=response)
            except ProtocolError as exc:
                answer = _error_response(message, exc)
            await answers.put(answer)

        async def read() -> None:
            running: set[asyncio.Task] = set()
            try:
                async for message in request_iterator:
                    task = asyncio.ensure_future(one(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                for task in running:  # the call ended first: its generations are cancelled
                    task.cancel()
                await answers.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not done:
                yield answer
        finally:
            reader.cancel()

    async def _generate(self, message: service_pb2.ModelInferRequest, deployed: Deployed, put) -> None:
        """One generation: its tokens `put` as responses, the last flagged final, or its error; cancelled with
        the task that runs it (its sequence then leaves the batch), written once to the access log."""
        started = time.perf_counter()
        model, engine = deployed.model, deployed.generator
        stream = None
        try:
            request = infer_request(message)
            wanted = _generation_outputs(message)
            params = sampling_params(request.parameters)
            prompt = prompt_ids(request, engine)
        except ProtocolError as exc:  # not started: answered as Triton answers a request it could not issue
            access_log(model.name, model.version, message.id or None, HTTP_STATUS[type(exc)], started,
                       error=exc.message)
            await put(_error_response(message, exc))
            return
        try:
            stream = engine.submit(prompt, params)
            async with asyncio.timeout(request.timeout_us / 1e6 if request.timeout_us else None):
                async for event in stream:
                    await put(_token_response(deployed, message.id, event, wanted))
        except Exception as exc:  # its error ends this generation, never the stream's others
            if isinstance(exc, ProtocolError):
                error = exc
            elif isinstance(exc, TimeoutError):
                error = DeadlineExceeded(f"the request's timeout of {request.timeout_us} µs expired before its "
                                         "generation ended")
            else:
                error = Internal(f"internal error: {type(exc).__name__}: {exc}")
                log.exception("model %s: 500 %s", model.name, error.message)
            access_log(model.name, model.version, message.id or None, HTTP_STATUS[type(error)], started,
                       error=error.message)
            await put(_error_response(message, error, final=True))
            return
        finally:
            if stream is not None:
                stream.cancel()  # nothing once it has ended; else (cancelled, timed out) its sequence leaves
        access_log(model.name, model.version, message.id or None, 200, started)


class GrpcFrontEnd:
    """The gRPC server, started and stopped with the HTTP app (create_app's companions)."""

    def __init__(self, server: InferenceServer, host: str, port: int, max_message_bytes: int,
                 budget: BodyBudget) -> None:
        """`budget`: the bytes of bodies held at once, shared with the HTTP app (HttpSettings.body_budget)."""
        self.server, self.host, self.port, self.max_message_bytes = server, host, port, max_message_bytes
        self.budget = budget
        self._grpc: grpc.aio.Server | None = None
        self._servicer: InferenceServicer | None = None

    async def start(self) -> None:
        # so_reuseport off: a second server on the same port is an error, not a silent share of its traffic.
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                              ("grpc.max_receive_message_length", self.max_message_bytes),
                                              ("grpc.max_send_message_length", -1)])
        self._servicer = InferenceServicer(self.server, self.budget)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, self._grpc)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self._grpc.add_insecure_port(address)
        await self._grpc.start()

    async def stop(self, grace: float) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._servicer is not None:
            self._servicer.close()
