"""Every form of YatGemm follows yatdeploy.spec.YAT_GEMM."""

from __future__ import annotations

import inspect

import pytest
import torch

from yatdeploy import dtypes
from yatdeploy.ops.onnx_function import function_proto_for
from yatdeploy.ops.onnx_schema import yat_gemm_schema
from yatdeploy.ops.torch_op import yat_gemm
from yatdeploy.spec import MATH_ATTRIBUTES, PLUGIN_NAMESPACE, YAT_GEMM


def test_onnx_schema_matches_spec():
    schema = yat_gemm_schema()
    assert (schema.name, schema.domain, schema.since_version) == (YAT_GEMM.name, YAT_GEMM.domain, YAT_GEMM.version)
    assert [p.name for p in schema.inputs] == [t.name for t in YAT_GEMM.inputs]
    optional = schema.inputs[2].option
    assert optional == type(optional).Optional
    assert [p.name for p in schema.outputs] == ["Y"]
    assert set(schema.attributes) == {a.name for a in YAT_GEMM.attributes}
    assert schema.attributes["eps"].default_value.f == pytest.approx(YAT_GEMM.attribute("eps").default, rel=1e-7)
    assert schema.attributes["plugin_namespace"].default_value.s.decode() == PLUGIN_NAMESPACE
    allowed = set(schema.type_constraints[0].allowed_type_strs)
    assert allowed == {"tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"}


def test_torch_op_takes_the_spec_inputs_and_math_attributes():
    params = list(inspect.signature(yat_gemm._init_fn).parameters)
    assert params == [t.name.lower() for t in YAT_GEMM.inputs] + list(MATH_ATTRIBUTES)
    schema = torch.ops.yatdeploy.yat_gemm.default._schema
    assert "Tensor? b" in str(schema)


def test_every_function_body_declares_the_math_attributes_with_spec_defaults():
    for elem_type in YAT_GEMM.dtypes:
        proto = function_proto_for(elem_type)
        assert (proto.domain, proto.name) == (YAT_GEMM.domain, YAT_GEMM.name)
        assert list(proto.input) == [t.name for t in YAT_GEMM.inputs]
        defaults = {a.name: a.f for a in proto.attribute_proto}
        assert defaults == pytest.approx({"eps": YAT_GEMM.attribute("eps").default, "alpha": 1.0}, rel=1e-7)


def test_dtype_table_covers_the_spec():
    assert {dtypes.by_onnx(t).name for t in YAT_GEMM.dtypes} == {"float32", "float64", "float16", "bfloat16"}


def test_spec_type_numbers_are_onnx_numbers():
    from onnx import TensorProto

    from yatdeploy import spec

    assert (spec.ONNX_FLOAT, spec.ONNX_DOUBLE, spec.ONNX_FLOAT16, spec.ONNX_BFLOAT16) == (
        TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def test_the_cpp_header_carries_the_spec():
    from yatdeploy.spec import cpp_header

    header = cpp_header()
    assert 'kOpName = "YatGemm"' in header and 'kDomain = "yat"' in header
    assert 'kEpsAttribute = "eps"' in header and 'kAlphaAttribute = "alpha"' in header
    assert "kDefaultEps = 1e-05f" in header and "kDefaultAlpha = 1.0f" in header
    assert 'kCpuProvider = "CPUExecutionProvider"' in header
    assert ("kCpuDtypes[] = {ElemType::kFloat, ElemType::kDouble, ElemType::kFloat16, ElemType::kBFloat16}"
            in header)
    assert "kCudaDtypes[] = {ElemType::kFloat, ElemType::kFloat16, ElemType::kBFloat16}" in header


def test_implementations_cover_only_admitted_dtypes():
    from yatdeploy.spec import IMPLEMENTATIONS

    for implementation in IMPLEMENTATIONS.values():
        assert set(implementation.dtypes) <= set(YAT_GEMM.dtypes), implementation.name
    # ONNX Runtime never falls back from a registered library to the function: the CPU kernels cover all.
    assert set(IMPLEMENTATIONS["cpu"].dtypes) == set(YAT_GEMM.dtypes)


def test_finite_limits_are_the_dtypes():
    from yatdeploy.spec import FINITE_MAX, cpp_header

    assert set(FINITE_MAX) == set(YAT_GEMM.float32_accumulated)
    for elem_type, limit in FINITE_MAX.items():
        assert limit == torch.finfo(dtypes.by_onnx(elem_type).torch).max
    header = cpp_header()
    assert "kFloat16FiniteMax = 65504.0f" in header and "kBFloat16FiniteMax = 3.3895313892515355e+38f" in header
