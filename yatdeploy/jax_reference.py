"""The JAX side of export and validation: a Flax NNX model as the reference (a model_reference.ModelReference).

`JaxReference` runs the loaded NNX module eagerly on numpy arrays, names its outputs as yatdeploy names PyTorch's
(`output`, `output_0`, ... or a dict's keys), counts the Yat products a run computes (`yat_calls`: YatNMN calls,
YatEmbed.attend calls, Yat attention calls, YatConv calls) and, for the derived tolerances, runs a float64 copy of
the model in float64 (`jax_enable_x64` on for that run only): nmn.nnx's Yat layers compute in float32 whatever their
inputs, so the model's trace is evaluated with every float32 widened to float64. It imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from yatdeploy import dtypes
from yatdeploy.errors import YatDeployError, cannot_run, first_line, option
from yatdeploy.jax_loading import JaxLoadedModel

# The kinds of Yat product a run computes, as the export's report counts them (yatdeploy.exporting's kinds).
YATNMN, ATTEND, ATTENTION, CONV = "YatNMN", "attend head", "attention", "YatConv"
FUSED_KINDS = (YATNMN, ATTEND, ATTENTION)  # those yatdeploy.fusion writes as YatGemm nodes


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _flatten(out: object) -> tuple[list[object], list[str]]:
    """A model's outputs as a list, and their ONNX names: an array or a tuple/list of arrays (`output`, `output_0`,
    ...), or a dict of arrays (its keys, sorted, as JAX flattens a dict and jax2onnx orders the outputs)."""
    if isinstance(out, Mapping):
        keys = sorted(out)
        values, names = [out[k] for k in keys], [str(k) for k in keys]
    else:
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        names = _output_names(len(values))
    if not values or not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in values):
        raise YatDeployError("the model returns something other than an array, a tuple of arrays or a dict of arrays")
    return values, names


def model_dtype(module: object) -> str:
    """The dtype of the module's first floating parameter; float32 without one."""
    from flax import nnx

    for _, value in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        array = value.get_value() if hasattr(value, "get_value") else value
        if np.issubdtype(array.dtype, np.floating):
            return dtypes.row(str(np.dtype(array.dtype))).name
    return "float32"


@dataclass
class JaxReference:
    """The Flax NNX model as export and validation run it: `loaded`'s module, in its own dtype."""

    framework: ClassVar[str] = "JAX"
    loaded: JaxLoadedModel
    dtype: str
    module: object  # the flax.nnx.Module
    output_names: list[str] = field(default_factory=list)  # known once the model has run

    @staticmethod
    def of(loaded: JaxLoadedModel, dtype: str | None = None) -> JaxReference:
        own = model_dtype(loaded.module)
        if dtype is not None and dtype != own:
            raise YatDeployError(f"{option('dtype')} {dtype}: a Flax NNX model exports in its own dtype ({own})",
                                 f"leave {option('dtype')} out, or cast the model's state in JAX before exporting")
        return JaxReference(loaded, own, loaded.module)

    def call(self, xs: Sequence[object], what: str) -> list[object]:
        """The module's outputs (JAX arrays) on positional inputs `xs`; an InputSpecError naming `what` to check."""
        try:
            out = self.module(*xs)
        except Exception as exc:
            raise cannot_run([f"{tuple(x.shape)} {x.dtype}" for x in xs], exc, what) from exc
        values, self.output_names = _flatten(out)
        return values

    def run(self, arrays: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:
        import jax.numpy as jnp

        return [np.asarray(v) for v in self.call([jnp.asarray(a) for a in arrays.values()], what)]

    def run_counting(self, arrays: Mapping[str, np.ndarray], what: str) -> tuple[list[np.ndarray], int]:
        outputs: list[list[np.ndarray]] = []
        calls = yat_calls(lambda: outputs.append(self.run(arrays, what)))
        return outputs[0], sum(n for kind, n in calls.items() if kind in FUSED_KINDS)

    def yat_gemm_check(self, nodes: int, calls: int) -> tuple[bool, str]:
        """One YatGemm node per Yat product the fusion turns into one (YatNMN, YatEmbed.attend, attention scores):
        jax2onnx writes them decomposed, and the export fuses them (yatdeploy.fusion). YatConvs stay decomposed."""
        return nodes == calls, f"{nodes} YatGemm nodes for {calls} Yat products (YatNMN, attend, attention)"

    def int_range(self) -> tuple[int, int]:
        from flax import nnx

        from yatdeploy.cases import DEFAULT_INT_RANGE

        sizes = [node.num_embeddings for _, node in nnx.iter_graph(self.module)
                 if isinstance(getattr(node, "num_embeddings", None), int)]
        return (0, min(sizes)) if sizes else DEFAULT_INT_RANGE

    def float64_runs(self, cases: Sequence[Mapping[str, np.ndarray]],
                     expected: Sequence[list[np.ndarray]]) -> tuple[list[list[np.ndarray]] | None, str]:
        """The model in float64: traced (jax.make_jaxpr) with its state and inputs cast to float64 under
        jax_enable_x64, then evaluated with every float32 in the trace widened to float64 (casts, literals,
        constants, result dtypes), since nmn.nnx casts its Yat math to float32 whatever its inputs (YatNMN's
        compute_mode "fp32", the attention core): casting the state alone would give float32 values."""
        if self.dtype == "float64":
            return ([[np.asarray(w, dtype=np.float64) for w in want] for want in expected],
                    "the JAX run itself (a float64 export)")
        runs = []
        for arrays, want in zip(cases, expected):
            try:
                outs = _run_widened(self.module, list(arrays.values()))
            except Exception as exc:  # a primitive that does not take float64, control flow the evaluator skips
                return None, f"none: the model does not run in float64 ({first_line(exc)})"
            if len(outs) != len(want) or not all(
                o.dtype == np.float64 and tuple(o.shape) == tuple(w.shape) for o, w in zip(outs, want)
            ):
                return None, "none: in float64, the model does not compute in float64 (a fixed compute dtype?)"
            runs.append(outs)
        if all(np.array_equal(o, o.astype(np.float32), equal_nan=True) for run in runs for o in run):
            return None, "none: widened to float64, the model still computes in float32"
        return runs, ("a float64 run of the JAX model on the same inputs (its trace evaluated with every float32 "
                      "widened, jax_enable_x64)")


_INLINED = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
            "remat", "checkpoint")  # primitives whose inner trace is evaluated in place, widened too


def _run_widened(module: object, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def wide(a):
        return jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a)

    with jax.enable_x64(True):
        graphdef, state = nnx.split(module)
        state64 = jax.tree.map(wide, state)
        xs = [wide(a) for a in inputs]

        def call(state, *xs):
            return _flatten(nnx.merge(graphdef, state)(*xs))[0]

        closed = jax.make_jaxpr(call)(state64, *xs)
        outs = _eval_widened(closed.jaxpr, closed.consts, jax.tree.leaves((state64, *xs)))
        return [np.asarray(o) for o in outs]


def _eval_widened(jaxpr, consts, args) -> list:
    """jax.core.eval_jaxpr, with float32 widened to float64 everywhere it appears."""
    import jax.numpy as jnp
    from jax.extend import core as jcore

    f32 = np.dtype(np.float32)

    def up(x):
        return jnp.asarray(x, jnp.float64) if getattr(x, "dtype", None) == f32 else x

    def param(value):
        return np.dtype(np.float64) if isinstance(value, np.dtype) and value == f32 else value

    env = {}

    def read(var):
        return up(var.val) if isinstance(var, jcore.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = up(value)
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = [p for p in eqn.params.values() if isinstance(p, (jcore.ClosedJaxpr, jcore.Jaxpr))]
        if inner and eqn.primitive.name in _INLINED:
            sub = inner[0]
            sub_jaxpr, sub_consts = (sub.jaxpr, sub.consts) if isinstance(sub, jcore.ClosedJaxpr) else (sub, [])
            outs = _eval_widened(sub_jaxpr, sub_consts, invals[:len(sub_jaxpr.invars)])
        else:
            params = {k: param(v) for k, v in eqn.params.items()}
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _yat_methods() -> list[tuple[type, str, str]]:
    """(class, method, kind) of every nmn.nnx method that computes a Yat product."""
    import nmn.nnx as nmn_nnx

    return [(nmn_nnx.YatNMN, "__call__", YATNMN), (nmn_nnx.YatEmbed, "attend", ATTEND),
            (nmn_nnx.MultiHeadYatAttention, "__call__", ATTENTION), (nmn_nnx.RotaryYatAttention, "__call__", ATTENTION),
            (nmn_nnx.YatConv, "__call__", CONV), (nmn_nnx.YatConvTranspose, "__call__", CONV)]


@contextmanager
def _counting(calls: dict[str, int]) -> Iterator[None]:
    patched = []
    for cls, name, kind in _yat_methods():
        original = cls.__dict__.get(name)
        if original is None:
            continue

        def counted(self, *args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(self, *args, **kwargs)

        setattr(cls, name, counted)
        patched.append((cls, name, original))
    try:
        yield
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)


def yat_calls(run: Callable[[], object]) -> dict[str, int]:
    """The Yat products `run()` computes through nmn.nnx layers, per kind (a layer called twice counts twice)."""
    calls = dict.fromkeys((YATNMN, ATTEND, ATTENTION, CONV), 0)
    with _counting(calls):
        run()
    return calls
