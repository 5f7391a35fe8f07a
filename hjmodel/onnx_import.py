"""Import a third-party ONNX graph that *is* an LSE network, so it can be served with diagnostics.

Recognised (walking back from the graph's one output; constants are initializers or Constant nodes):

    output = [Mul by m]( ReduceLogSumExp( [Reshape to (-1, K, P)]( [Mul by s | Div by 1/s]( a ) ) ) )
    a      = Add(MatMul(z, Wt), b)  |  Gemm(z, W, b)  |  MatMul(z, Wt)
    z      = x  or  x through Sub / Add / Mul / Div by constants and MatMul by a constant matrix

so output = m * LSE(s * a) = eps * LSE(a' / eps) with eps = m and a' = m s a: an LSE layer with
K groups of P contiguous neurons (K = 1 without the Reshape). The input chain is an affine map
z = x M + c, kept as the artifact's preprocessing when it is (x - mu) A^T, else folded into W and b
(exactly: certificates stay in raw input units). Anything else is refused with an
:class:`~hjmodel.errors.ArtifactError` naming the first node that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .byom import export
from .errors import ArtifactError

__all__ = ["import_onnx", "lse_state_from_onnx"]


class _Graph:
    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        try:
            self.proto = onnx.load(str(path))
        except Exception as exc:
            raise ArtifactError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from exc
        graph = self.proto.graph
        self.consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
        self.producer = {}
        for node in graph.node:
            if node.op_type == "Constant":
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.consts[node.output[0]] = numpy_helper.to_array(value.t).astype(np.float64)
                continue
            for out in node.output:
                self.producer[out] = node
        inputs = [i.name for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ArtifactError(f"{path}: expected one input and one output, got inputs {inputs} and "
                                f"{len(graph.output)} outputs")
        self.input, self.output = inputs[0], graph.output[0].name
        dims = next(i for i in graph.input if i.name == self.input).type.tensor_type.shape.dim
        self.d = dims[-1].dim_value if len(dims) == 2 and dims[-1].dim_value > 0 else None

    def node(self, name: str):
        return self.producer.get(name)

    def const(self, name: str):
        return self.consts.get(name)

    @staticmethod
    def attr(node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _refuse(node, why: str) -> ArtifactError:
    label = f"node {node.name!r} ({node.op_type})" if node is not None else "the graph's input"
    return ArtifactError(f"not an LSE network: {label} does not fit: {why}")


def _scalar_operand(g: _Graph, node) -> tuple[str, float] | None:
    """(the other input, the scalar constant) of a binary node with one scalar constant operand."""
    a, b = node.input[0], node.input[1]
    for tensor, const in ((a, g.const(b)), (b, g.const(a))):
        if const is not None and const.size == 1:
            return tensor, float(const.reshape(-1)[0])
    return None


def _affine_input(g: _Graph, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """z = x M + c for the chain from the graph input to ``name`` (M None: identity, c None: 0)."""
    if name == g.input:
        return None, None
    node = g.node(name)
    if node is None:
        raise _refuse(None, f"tensor {name!r} is neither the input nor produced by a node")
    op = node.op_type
    if op in ("Sub", "Add", "Mul", "Div", "MatMul"):
        first, second = node.input[0], node.input[1]
        if op in ("Add", "Mul") and g.const(first) is not None and g.const(second) is None:
            first, second = second, first   # commutative: the constant may come first
        const = g.const(second)
        if const is None or g.const(first) is not None:
            raise _refuse(node, "expected the input chain to combine the input with one constant")
        M, c = _affine_input(g, first)
        if M is None:
            width = const.shape[0] if op == "MatMul" else (g.d or const.size)
            if op != "MatMul" and const.size not in (1, width):
                raise _refuse(node, f"a constant of {const.size} values for {width} features")
            M = np.eye(width)
        c = np.zeros(M.shape[1]) if c is None else c
        if op == "MatMul":
            return M @ const, c @ const
        v = np.broadcast_to(const.reshape(-1), (M.shape[1],)).astype(np.float64)
        if op == "Sub":
            return M, c - v
        if op == "Add":
            return M, c + v
        if op == "Mul":
            return M * v, c * v
        return M / v, c / v
    raise _refuse(node, "the input may only pass through Sub, Add, Mul, Div or MatMul by constants")


def _affine(g: _Graph, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(W (N, p), b (N,), the name of z) of the pre-activations a = z W^T + b."""
    node = g.node(name)
    if node is None:
        raise _refuse(None, "the pre-activations must come from MatMul / Add or Gemm")
    if node.op_type == "Add":
        for lin, bias in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            b = g.const(bias)
            inner = g.node(lin)
            if b is not None and inner is not None and inner.op_type == "MatMul":
                W, _, z = _affine(g, lin)
                return W, np.broadcast_to(b.reshape(-1), (W.shape[0],)).copy(), z
        raise _refuse(node, "expected Add(MatMul(z, W), b) with a constant bias")
    if node.op_type == "MatMul":
        Wt = g.const(node.input[1])
        if Wt is None or Wt.ndim != 2:
            raise _refuse(node, "expected MatMul(z, W) with a constant 2-D weight")
        return Wt.T.copy(), np.zeros(Wt.shape[1]), node.input[0]
    if node.op_type == "Gemm":
        W = g.const(node.input[1])
        if W is None or W.ndim != 2 or g.attr(node, "transA", 0):
            raise _refuse(node, "expected Gemm(z, W, b) with a constant weight and no transA")
        alpha, beta = g.attr(node, "alpha", 1.0), g.attr(node, "beta", 1.0)
        W = (W if g.attr(node, "transB", 0) else W.T) * alpha
        b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(W.shape[0])
        if b is None:
            raise _refuse(node, "expected a constant Gemm bias")
        return W, np.broadcast_to(b.reshape(-1) * beta, (W.shape[0],)).copy(), node.input[0]
    raise _refuse(node, "the pre-activations must come from MatMul / Add or Gemm")


def lse_state_from_onnx(path: str | Path) -> dict:
    """The plain tensors of the LSE network an ONNX graph computes (see the module docstring), as a
    state dict for :func:`hjmodel.nn.from_state_dict`: ``W``, ``b``, ``eps``, ``pieces`` and, when
    the input chain is ``(x - mu) A^T``, ``mu`` and ``A``."""
    g = _Graph(Path(path))
    name, m = g.output, 1.0
    node = g.node(name)
    if node is not None and node.op_type == "Mul" and _scalar_operand(g, node):
        name, m = _scalar_operand(g, node)
        node = g.node(name)
    if node is None or node.op_type != "ReduceLogSumExp":
        raise _refuse(node, "the output must be ReduceLogSumExp (optionally times a constant eps)")
    reduce = node
    axes = g.attr(reduce, "axes")
    if axes is None and len(reduce.input) > 1 and reduce.input[1]:
        axes = [int(a) for a in g.const(reduce.input[1]).reshape(-1)]
    name = reduce.input[0]
    node = g.node(name)
    groups, s = None, 1.0
    while node is not None:   # a Reshape to (-1, K, P) and a scaling by a constant, in either order
        if node.op_type == "Reshape" and groups is None:
            shape = g.const(node.input[1])
            if shape is None or shape.size != 3 or list(axes or []) not in ([2], [-1]):
                raise _refuse(node, "a Reshape before the reduction must give (-1, K, P), reduced over its last axis")
            groups = int(shape.reshape(-1)[1])
            name = node.input[0]
        elif node.op_type in ("Mul", "Div") and s == 1.0 and _scalar_operand(g, node):
            if node.op_type == "Div" and g.const(node.input[0]) is not None:
                raise _refuse(node, "a constant divided by the pre-activations is not an LSE network")
            name, value = _scalar_operand(g, node)
            s = value if node.op_type == "Mul" else 1.0 / value
        else:
            break
        node = g.node(name)
    if groups is None and list(axes or [-1]) not in ([1], [-1]):
        raise _refuse(reduce, f"the reduction must run over the neurons (the last axis), got axes {axes}")
    if m <= 0 or s <= 0:
        raise ArtifactError(f"not an LSE network: the temperature must be positive (scale {s}, factor {m})")
    W, b, z = _affine(g, name)
    M, c = _affine_input(g, z)
    N = W.shape[0]
    pieces = N if groups is None else N // groups
    if groups is not None and N % groups:
        raise _refuse(reduce, f"{N} neurons do not reshape into {groups} groups")
    W, b = W * (m * s), b * (m * s)    # m LSE(s a) = eps LSE(a'/eps) with eps = m, a' = m s a
    state = {"W": W, "b": b, "eps": m, "pieces": pieces}
    if M is None:
        return state
    # z = x M + c: keep it as preprocessing (x - mu) A^T when c = -mu M has a solution, else fold it
    mu, *_ = np.linalg.lstsq(M.T, -c, rcond=None)
    if np.allclose(-mu @ M, c, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(c).max(initial=0.0)))):
        state.update(mu=mu, A=M.T)
    else:
        state.update(W=W @ M.T, b=b + W @ c)
    return state


def import_onnx(path: str | Path, calibration_data, out: str | Path, *, task: str | None = None, **export_options):
    """Recognise the LSE network in a third-party ONNX graph and write a serving artifact of it
    (:func:`hjmodel.export`, which calibrates the OOD gate on ``calibration_data``)."""
    return export(lse_state_from_onnx(path), calibration_data, out, task=task, **export_options)
