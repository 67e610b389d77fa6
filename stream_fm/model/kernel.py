"""Compiled FM kernels: one call runs a whole ``OpBatch`` strictly in order.

Model (Rendle 2010) in O(n k)::

    y = w0 + sum_i w_i x_i + sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2] / 2

``p = sigmoid(y)``, logistic loss, ``g = dloss/dy = p - label`` clipped to ``+-clip``.

State lives in float64 arrays owned by the caller (``FastFM``):

* ``bias``   ``[w0, z0, n0]``: intercept and its optimizer state (AdaGrad sum in ``n0``).
* ``w``      ``(B,)`` linear weights (for FTRL: materialised from ``z`` and ``n``).
* ``v``      ``(B, k)`` C-order latent vectors, one cache-friendly row per bucket.
* ``w_z``    ``(B,)`` FTRL ``z`` (empty otherwise).
* ``w_n``    ``(B,)`` AdaGrad squared-gradient sum / FTRL ``n`` (empty for SGD).
* ``v_acc``  ``(B, k)`` AdaGrad sums of the latents (``(0, k)`` for SGD).
* ``counters`` int64 ``[learn ops, refused updates, non-finite outputs]``.

Numeric guard: a learn step updates in place while keeping a backup of every value it touches;
if any new value (weight or optimizer state) is NaN or infinite, the backup is restored in
reverse order (so repeated buckets come back right too) and the step is counted as refused.

Repeated buckets within one example (the hasher merges them, so this is only a safety net)
act as occurrences of one shared parameter: they are updated one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

F = TypeVar("F", bound=Callable[..., Any])

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]


# fastmath stays off: determinism (bitwise replay) and the NaN/inf guard need IEEE rules.
# error_model="numpy": x/0 gives inf (caught by the guard) instead of a per-division branch
# that raises and blocks vectorisation. nogil: Kafka I/O threads keep running meanwhile.
_OPTIONS: Final[dict[str, Any]] = {"error_model": "numpy", "nogil": True}


def jit(fn: F) -> F:
    """``numba.njit(cache=True, fastmath=False)`` that keeps the signature for mypy."""
    return cast(F, njit(cache=True, fastmath=False, **_OPTIONS)(fn))


def jit_inline(fn: F) -> F:
    """Like ``jit`` but inlined into callers at numba IR level: no call, no refcounting."""
    return cast(F, njit(cache=True, fastmath=False, inline="always", **_OPTIONS)(fn))


OPT_SGD: Final = 0
OPT_ADAGRAD: Final = 1
OPT_FTRL: Final = 2
OPTIMIZER_CODES: Final = {"sgd": OPT_SGD, "adagrad": OPT_ADAGRAD, "ftrl": OPT_FTRL}

# Layout of the ``hp`` hyperparameter array.
HP_LR_W: Final = 0
HP_LR_V: Final = 1
HP_LR_0: Final = 2
HP_L1_W: Final = 3
HP_L2_W: Final = 4
HP_L2_V: Final = 5
HP_ALPHA: Final = 6
HP_BETA: Final = 7
HP_EPS: Final = 8
HP_CLIP: Final = 9
N_HP: Final = 10

# Layout of ``counters``.
C_LEARNED: Final = 0
C_REFUSED: Final = 1
C_NONFINITE: Final = 2
N_COUNTERS: Final = 3

# |y| is clamped here before the sigmoid so p stays strictly inside (0, 1) in float64.
LOGIT_CLAMP: Final = 36.0

# Codes returned by ``check_batch``.
BATCH_OK: Final = 0
BAD_SHAPES: Final = 1
BAD_INDPTR: Final = 2
BAD_INDEX: Final = 3
BAD_ROW: Final = 4
BAD_KIND: Final = 5
BAD_LABEL: Final = 6
BATCH_ERRORS: Final = {
    BAD_SHAPES: "array lengths disagree (indices/values, op_kind/op_row/op_label)",
    BAD_INDPTR: "indptr must start at >= 0, be non-decreasing and end within indices",
    BAD_INDEX: "a feature index is outside [0, n_buckets)",
    BAD_ROW: "an op_row is outside the example rows",
    BAD_KIND: "an op_kind is neither OP_SCORE (0) nor OP_LEARN (1)",
    BAD_LABEL: "a learn op has a label other than 0 or 1",
}


@jit
def check_batch(
    indptr: I64, indices: I32, values: F64, op_kind: I8, op_row: I64, op_label: I8, n_buckets: int
) -> int:
    """Validate a batch before the unchecked kernel indexes with it (numba skips bounds checks)."""
    if indices.shape[0] != values.shape[0] or indptr.shape[0] < 1:
        return BAD_SHAPES
    if op_row.shape[0] != op_kind.shape[0] or op_label.shape[0] != op_kind.shape[0]:
        return BAD_SHAPES
    n_rows = indptr.shape[0] - 1
    if indptr[0] < 0 or indptr[n_rows] > indices.shape[0]:
        return BAD_INDPTR
    for r in range(n_rows):
        if indptr[r + 1] < indptr[r]:
            return BAD_INDPTR
    for p in range(indptr[0], indptr[n_rows]):
        if indices[p] < 0 or indices[p] >= n_buckets:
            return BAD_INDEX
    for j in range(op_kind.shape[0]):
        if op_row[j] < 0 or op_row[j] >= n_rows:
            return BAD_ROW
        kind = op_kind[j]
        if kind != 0 and kind != 1:
            return BAD_KIND
        if kind == 1 and op_label[j] != 0 and op_label[j] != 1:
            return BAD_LABEL
    return BATCH_OK


@jit_inline
def forward(
    a: int, b: int, indices: I32, values: F64, w0: float, w: F64, v: F64, s: F64, q: F64
) -> float:
    """Raw score y of features ``a:b``; leaves the per-factor sums ``s_f`` in ``s``."""
    k = v.shape[1]
    for f in range(k):
        s[f] = 0.0
        q[f] = 0.0
    lin = 0.0
    for p in range(a, b):
        j = indices[p]
        x = values[p]
        lin += w[j] * x
        for f in range(k):
            t = v[j, f] * x
            s[f] += t
            q[f] += t * t
    inter = 0.0
    for f in range(k):
        inter += s[f] * s[f] - q[f]
    return w0 + lin + 0.5 * inter


@jit_inline
def sigmoid(y: float) -> float:
    """Numerically stable logistic function, kept strictly inside (0, 1)."""
    y = min(max(y, -LOGIT_CLAMP), LOGIT_CLAMP)
    if y >= 0.0:
        return 1.0 / (1.0 + math.exp(-y))
    e = math.exp(y)
    return e / (1.0 + e)


@jit_inline
def loss_gradient(y: float, label: int, clip: float) -> float:
    """d logloss / dy = p - label, in the overflow-free form river uses; clipped."""
    g = -1.0 / (math.exp(y) + 1.0) if label == 1 else 1.0 / (math.exp(-y) + 1.0)
    return max(min(g, clip), -clip)


@jit_inline
def _restore(
    a: int,
    n: int,
    indices: I32,
    bias: F64,
    w: F64,
    v: F64,
    w_z: F64,
    w_n: F64,
    v_acc: F64,
    bk_bias: F64,
    bk_w: F64,
    bk_z: F64,
    bk_n: F64,
    bk_v: F64,
    bk_va: F64,
) -> None:
    """Undo a refused step; reverse order so a repeated bucket ends at its first backup."""
    k = v.shape[1]
    has_z = w_z.shape[0] > 0
    has_n = w_n.shape[0] > 0
    has_va = v_acc.shape[0] > 0
    for i in range(n - 1, -1, -1):
        j = indices[a + i]
        w[j] = bk_w[i]
        if has_z:
            w_z[j] = bk_z[i]
        if has_n:
            w_n[j] = bk_n[i]
        for f in range(k):
            v[j, f] = bk_v[i, f]
            if has_va:
                v_acc[j, f] = bk_va[i, f]
    for t in range(3):
        bias[t] = bk_bias[t]


@jit_inline
def learn_sgd(
    a: int, b: int, indices: I32, values: F64, g: float, hp: F64, bias: F64, w: F64, v: F64,
    s: F64, bk_w: F64, bk_v: F64,
) -> bool:  # fmt: skip
    """Plain SGD in river's exact order: intercept, then weights, then latents (from ``s``).

    Returns False (state untouched) if any new value would be NaN or infinite.
    """
    k = v.shape[1]
    lr_w = hp[HP_LR_W]
    lr_v = hp[HP_LR_V]
    l2_w = hp[HP_L2_W]
    l2_v = hp[HP_L2_V]
    old_w0 = bias[0]
    # river: intercept -= intercept_lr * g (no L2 on the intercept).
    new_w0 = old_w0 - hp[HP_LR_0] * g
    ok = new_w0 - new_w0 == 0.0
    bias[0] = new_w0
    n = b - a
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        wj = w[j]
        bk_w[i] = wj
        nw = wj - lr_w * (g * x + l2_w * wj)
        ok &= nw - nw == 0.0
        w[j] = nw
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        xx = x * x
        for f in range(k):
            vf = v[j, f]
            bk_v[i, f] = vf
            nv = vf - lr_v * (g * (x * s[f] - vf * xx) + l2_v * vf)
            # x - x is 0 for finite x and NaN otherwise: a branch-free, vectorisable check.
            ok &= nv - nv == 0.0
            v[j, f] = nv
    if not ok:
        bias[0] = old_w0
        for i in range(n - 1, -1, -1):
            j = indices[a + i]
            w[j] = bk_w[i]
            for f in range(k):
                v[j, f] = bk_v[i, f]
    return ok


@jit_inline
def learn_adaptive(
    a: int, b: int, indices: I32, values: F64, g: float, opt: int, hp: F64, bias: F64, w: F64,
    v: F64, w_z: F64, w_n: F64, v_acc: F64, s: F64, bk_bias: F64, bk_w: F64, bk_z: F64,
    bk_n: F64, bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """AdaGrad (every coordinate) or FTRL-Proximal (intercept + weights) with AdaGrad latents.

    Returns False (state untouched) if any new value would be NaN or infinite.
    """
    k = v.shape[1]
    lr_w = hp[HP_LR_W]
    lr_v = hp[HP_LR_V]
    lr_0 = hp[HP_LR_0]
    l1_w = hp[HP_L1_W]
    l2_w = hp[HP_L2_W]
    l2_v = hp[HP_L2_V]
    alpha = hp[HP_ALPHA]
    beta = hp[HP_BETA]
    eps = hp[HP_EPS]
    n = b - a
    for t in range(3):
        bk_bias[t] = bias[t]
    # x - x is 0 for finite x and NaN otherwise: a branch-free, vectorisable check.
    ok = True
    if opt == OPT_FTRL:
        if lr_0 > 0.0:
            # Intercept: FTRL with alpha = intercept_learning_rate and no L1/L2.
            n0 = bias[2]
            n0_new = n0 + g * g
            sigma = (math.sqrt(n0_new) - math.sqrt(n0)) / lr_0
            z0 = bias[1] + g - sigma * bias[0]
            bias[1] = z0
            bias[2] = n0_new
            bias[0] = -z0 / ((beta + math.sqrt(n0_new)) / lr_0)
        for i in range(n):
            j = indices[a + i]
            gi = g * values[a + i]
            wj = w[j]
            zj = w_z[j]
            nj = w_n[j]
            bk_w[i] = wj
            bk_z[i] = zj
            bk_n[i] = nj
            nj_new = nj + gi * gi
            sigma = (math.sqrt(nj_new) - math.sqrt(nj)) / alpha
            zj = zj + gi - sigma * wj
            if abs(zj) <= l1_w:
                wj = 0.0
            else:
                sign = 1.0 if zj > 0.0 else -1.0
                wj = -(zj - sign * l1_w) / ((beta + math.sqrt(nj_new)) / alpha + l2_w)
            w_z[j] = zj
            w_n[j] = nj_new
            w[j] = wj
            ok &= (zj - zj) + (nj_new - nj_new) + (wj - wj) == 0.0
    else:
        g0 = bias[2] + g * g
        bias[2] = g0
        bias[0] -= lr_0 / math.sqrt(g0 + eps) * g
        for i in range(n):
            j = indices[a + i]
            wj = w[j]
            nj = w_n[j]
            bk_w[i] = wj
            bk_n[i] = nj
            gw = g * values[a + i] + l2_w * wj
            nj += gw * gw
            wj -= lr_w / math.sqrt(nj + eps) * gw
            w_n[j] = nj
            w[j] = wj
            ok &= (nj - nj) + (wj - wj) == 0.0
    for t in range(3):
        ok &= bias[t] - bias[t] == 0.0
    # Latents: AdaGrad for both adaptive optimizers; gradients use the pre-step sums ``s``.
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        xx = x * x
        for f in range(k):
            vf = v[j, f]
            af = v_acc[j, f]
            bk_v[i, f] = vf
            bk_va[i, f] = af
            gv = g * (x * s[f] - vf * xx) + l2_v * vf
            af += gv * gv
            vf -= lr_v / math.sqrt(af + eps) * gv
            v_acc[j, f] = af
            v[j, f] = vf
            ok &= (vf - vf) + (af - af) == 0.0
    if ok:
        return True
    _restore(a, n, indices, bias, w, v, w_z, w_n, v_acc, bk_bias, bk_w, bk_z, bk_n, bk_v, bk_va)
    return False


@jit
def run_ops(
    indptr: I64, indices: I32, values: F64, op_kind: I8, op_row: I64, op_label: I8, opt: int,
    hp: F64, bias: F64, w: F64, v: F64, w_z: F64, w_n: F64, v_acc: F64, counters: I64, out: F64,
) -> None:  # fmt: skip
    """Run every op in order; ``out[j]`` = p before op ``j`` ran. Call ``check_batch`` first.

    A learn right after a score of the same row reuses that score's forward pass: nothing
    changed the model in between, so the result is bitwise the same and half the work.
    """
    k = v.shape[1]
    n_rows = indptr.shape[0] - 1
    max_nnz = 0
    for r in range(n_rows):
        max_nnz = max(max_nnz, indptr[r + 1] - indptr[r])
    # Scratch, allocated once per batch rather than per op.
    s = np.empty(k)
    q = np.empty(k)
    bk_bias = np.empty(3)
    bk_w = np.empty(max_nnz)
    bk_z = np.empty(max_nnz)
    bk_n = np.empty(max_nnz)
    bk_v = np.empty((max_nnz, k))
    bk_va = np.empty((max_nnz, k))
    clip = hp[HP_CLIP]
    cached_row = -1
    cached_y = 0.0
    for j in range(op_kind.shape[0]):
        r = op_row[j]
        a = indptr[r]
        b = indptr[r + 1]
        if op_kind[j] == 1 and r == cached_row:
            y = cached_y
        else:
            y = forward(a, b, indices, values, bias[0], w, v, s, q)
        if math.isnan(y):
            # Only reachable with absurd inputs (e.g. x = 1e300); serve an uninformative p.
            out[j] = 0.5
            counters[C_NONFINITE] += 1
        else:
            out[j] = sigmoid(y)
        if op_kind[j] == 0:
            cached_row = r
            cached_y = y
            continue
        cached_row = -1
        counters[C_LEARNED] += 1
        if not math.isfinite(y):
            counters[C_REFUSED] += 1
            continue
        g = loss_gradient(y, op_label[j], clip)
        if opt == OPT_SGD:
            ok = learn_sgd(a, b, indices, values, g, hp, bias, w, v, s, bk_w, bk_v)
        else:
            ok = learn_adaptive(
                a, b, indices, values, g, opt, hp, bias, w, v, w_z, w_n, v_acc, s,
                bk_bias, bk_w, bk_z, bk_n, bk_v, bk_va,
            )  # fmt: skip
        if not ok:
            counters[C_REFUSED] += 1


@jit
def ftrl_z_for_weight(w: float, n: float, alpha: float, beta: float, l1: float, l2: float) -> float:
    """The FTRL ``z`` whose closed-form weight is ``w`` (used to set weights by hand)."""
    if w == 0.0:
        return 0.0
    sign = 1.0 if w > 0.0 else -1.0
    return -(w * ((beta + math.sqrt(n)) / alpha + l2) + sign * l1)
