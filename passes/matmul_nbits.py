"""4-bit MatMul weights as onnxruntime's MatMulNBits, where that kernel is the faster one.

Before (float, ``x`` has one row)::

    x[1, K] -> MatMul(W[K, N]) -> y

After::

    x[1, K] -> com.microsoft.MatMulNBits(B = W as 4-bit blocks, scales) -> y

Each column of ``W`` is cut into blocks of `BLOCK_SIZE` along K; a block is quantized
symmetrically, ``s = max|w| / 7``, ``q = round(w / s) + 8`` in [1, 15] (the kernel's
default zero point is 8), and two values are packed per byte, the first in the low
nibble. ``accuracy_level`` 4 lets onnxruntime quantize ``x`` to int8 per block and run
integer dot products.

When (measured with onnxruntime 1.32, 1 thread, AVX-512 VNNI, interleaved runs of single
MatMul models): for a one-row input MatMulNBits is 8-16% faster than the int8-container kernel
(768x3072: 0.030 vs 0.035 ms; 4096x4096: 0.32 vs 0.39 ms) and stores a quarter of the
bytes; from 4 rows on it is 1.7x slower or worse (768x768, 4 rows: 0.024 vs 0.014 ms; 64
rows of 1024x4096: 2.1 vs 0.88 ms). So `insert_qdq` uses it only for one-row inputs and
keeps every other 4-bit weight in an int8 container.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes._graph import constant_array, is_default_domain, make_initializer

__all__ = ["BLOCK_SIZE", "ACCURACY_LEVEL", "nbits_is_faster", "quantize_blocks", "dequantize_blocks", "replace_with_nbits"]

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute on the activation (the fast path on x86)
MS_DOMAIN = "com.microsoft"


def _rows(x: ir.Value) -> int | None:
    """Product of all but the last dimension of ``x`` when every one is known."""
    shape = x.shape
    if shape is None or len(shape) < 1:
        return None
    rows = 1
    for d in list(shape)[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def nbits_is_faster(node: ir.Node) -> str | None:
    """Why this MatMul should run as MatMulNBits (4-bit weights), or None."""
    if node.op_type != "MatMul" or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    w = constant_array(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32 or w.shape[0] < BLOCK_SIZE:
        return None
    if _rows(node.inputs[0]) != 1:
        return None
    return (f"one-row input: onnxruntime's MatMulNBits (4-bit blocks of {BLOCK_SIZE}, int8 compute) "
            "is faster than the int8-container kernel there")


def quantize_blocks(w: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``W[K, N]`` -> (packed uint8 ``[N, blocks, block_size // 2]``, scales float32 ``[N * blocks]``)."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    cols = padded.T.reshape(n, blocks, block_size)
    scale = np.abs(cols).max(axis=-1) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = (np.clip(np.round(cols / scale[..., None]), -7, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1)


def dequantize_blocks(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """The float ``W[K, N]`` that MatMulNBits computes with (for tests and reports)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, 2 * half), np.int16)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    w = (q - 8).astype(np.float32) * scale.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k].T


def replace_with_nbits(model: ir.Model, node: ir.Node) -> ir.Node:
    """Swap the MatMul ``node`` for MatMulNBits with the same input and output."""
    graph = model.graph
    w = constant_array(node.inputs[1])
    k, n = w.shape
    packed, scale = quantize_blocks(w)
    base = node.inputs[1].name or f"{node.name}_B"
    b = make_initializer(graph, f"{base}_nbits", packed)
    s = make_initializer(graph, f"{base}_nbits_scale", scale)
    out = node.outputs[0]
    new = ir.node(
        "MatMulNBits", [node.inputs[0], b, s], domain=MS_DOMAIN, name=node.name,
        attributes={"K": k, "N": n, "bits": 4, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL},
        outputs=[ir.Value(name=f"{out.name}_nbits")],
    )
    new.outputs[0].type = out.type
    new.outputs[0].shape = out.shape
    graph.insert_before(node, new)
    name = out.name
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    new.outputs[0].name = name
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return new
