"""Compiled FM kernels: one call runs a whole ``OpBatch`` strictly in order.

Model (Rendle 2010) in O(n k)::

    y = w0 + sum_i w_i x_i + sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2] / 2

``p = sigmoid(y)``, logistic loss, ``g = dloss/dy = p - label`` clipped to ``+-clip``.

State lives in float64 arrays owned by the caller (``FastFM``):

* ``bias``  ``[w0, n0, z0]``: intercept and its optimizer state (AdaGrad sum / FTRL n, z).
* ``lin``   ``(B, m)`` per-bucket linear state, one row per bucket so one cache miss brings
  all of it: column ``LIN_W`` the weight, ``LIN_N`` the AdaGrad sum or FTRL ``n``, ``LIN_Z``
  the FTRL ``z`` (m = 1 for SGD, 2 for AdaGrad, 4 for FTRL: padded to 32 bytes).
* ``v``     ``(B, k)`` C-order latent vectors, one row per bucket.
* ``v_acc`` ``(B, k)`` AdaGrad sums of the latents (``(0, k)`` for SGD).
* ``counters`` int64 ``[learn ops, refused updates, non-finite outputs]``.

Numeric guard: a learn step updates in place while keeping a backup of every value it touches;
if any new value (weight or optimizer state) is NaN or infinite, the backup is restored in
reverse order (so a repeated bucket comes back right too) and the step is counted as refused.

Crosses (``interactions="all"``): each example also gets every pair of its features as a
linear-only feature (bucket ``cross_bucket(i, j)``, x = x_i x_j), built in scratch arrays just
before its forward pass, after its own features: positions ``c:b`` of a range have no latents.

A bucket repeated within one example (the hasher merges them, so this is only a safety net)
acts as occurrences of one shared parameter: the occurrences are updated one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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


def _prefetch_typer(typingctx: Any, arr: Any, offset: Any) -> Any:
    """``prefetch(arr, offset)``: hint the CPU to fetch the line of ``arr.flat[offset]``."""
    if not isinstance(arr, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, fnty, "llvm.prefetch.p0i8"
        )
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        # rw=0, locality=2: prefetcht1, into L2. Fetching into L1 (prefetcht0/prefetchw) ties
        # up the few L1 miss buffers the arithmetic's own loads need; measured ~1.7x slower.
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, offset), codegen


prefetch = cast(Callable[[npt.NDArray[Any], int], None], intrinsic(_prefetch_typer))

OPT_SGD: Final = 0
OPT_ADAGRAD: Final = 1
OPT_FTRL: Final = 2
OPT_ADAPTIVE: Final = 3
OPT_ADAM: Final = 4
OPTIMIZER_CODES: Final = {
    "sgd": OPT_SGD,
    "adagrad": OPT_ADAGRAD,
    "ftrl": OPT_FTRL,
    "adaptive": OPT_ADAPTIVE,
    "adam": OPT_ADAM,
}
# Adam's decay rates and epsilon (Kingma & Ba 2015, their defaults; fwumious_wabbit's too).
ADAM_BETA1: Final = 0.9
ADAM_BETA2: Final = 0.999
ADAM_EPS: Final = 1e-8
LIN_WIDTH: Final = {"sgd": 1, "adagrad": 2, "ftrl": 4, "adaptive": 4, "adam": 4}
#: The ``lin`` columns an optimizer writes (adaptive's fourth is padding, always zero).
LIN_USED: Final = {"sgd": 1, "adagrad": 2, "ftrl": 4, "adaptive": 3, "adam": 4}
LIN_W: Final = 0
LIN_N: Final = 1
LIN_Z: Final = 2
LIN_S: Final = 2  # adaptive: the largest |x| seen for the feature (normalized updates)
# adam: LIN_N the second moment, LIN_M the first, LIN_T the bucket's step count (the
# per-coordinate bias correction of lazy Adam; the bucket's latents share it).
LIN_M: Final = 2
LIN_T: Final = 3

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
HP_LR_X: Final = 10  # the crosses' weights (``HP_LR_W`` for the features')
N_HP: Final = 11

# Layout of ``bias`` and ``counters``.
B_W0: Final = 0
B_N0: Final = 1
B_Z0: Final = 2
B_NORM: Final = 3  # adaptive: sum over examples of sum_i (x_i / scale_i)^2, importance-weighted
B_TOTAL: Final = 4  # adaptive: sum of importance weights
# adam: B_N0 the intercept's second moment, B_M0 its first, B_T0 its step count.
B_M0: Final = 2
B_T0: Final = 3
N_BIAS: Final = 5
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
BAD_WEIGHT: Final = 7
BATCH_ERRORS: Final = {
    BAD_SHAPES: "array lengths disagree (indices/values, op_kind/op_row/op_label)",
    BAD_INDPTR: "indptr must start at >= 0, be non-decreasing and end within indices",
    BAD_INDEX: "a feature index is outside [0, n_buckets)",
    BAD_ROW: "an op_row is outside the example rows",
    BAD_KIND: "an op_kind is not OP_SCORE (0), OP_LEARN (1) or OP_LEARN_FNW (2)",
    BAD_LABEL: "a learn op has a label other than 0 or 1",
    BAD_WEIGHT: "an op_weight is negative or not finite",
}


@jit
def check_batch(
    indptr: I64, indices: I32, values: F64, op_kind: I8, op_row: I64, op_label: I8,
    op_weight: F64, n_buckets: int,
) -> int:  # fmt: skip
    """Validate a batch before the unchecked kernel indexes with it (numba skips bounds checks)."""
    if indices.shape[0] != values.shape[0] or indptr.shape[0] < 1:
        return BAD_SHAPES
    n_ops = op_kind.shape[0]
    if op_row.shape[0] != n_ops or op_label.shape[0] != n_ops or op_weight.shape[0] != n_ops:
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
        if kind != 0 and kind != 1 and kind != 2:
            return BAD_KIND
        if kind != 0 and op_label[j] != 0 and op_label[j] != 1:
            return BAD_LABEL
        if not (op_weight[j] >= 0.0 and op_weight[j] < np.inf):
            return BAD_WEIGHT
    return BATCH_OK


@jit_inline
def prefetch_feature(j: int, lin: F64, v: F64, v_acc: F64) -> None:
    """Ask for the cache lines a step on bucket ``j`` will touch.

    ``FastFM`` aligns the arrays to 64 bytes: a ``lin`` row (<= 32 bytes) is one line, a
    latent row of k <= 8 at most two (first and last element), k = 8 exactly one. Larger rows
    get their first and last lines only; a loop here would slow the forward pass it sits in.
    (A prefetch never faults, so even k = 0 is harmless.)
    """
    k = v.shape[1]
    ka = v_acc.shape[1]  # k, or 2k for Adam's two moments
    prefetch(lin, j * lin.shape[1])
    prefetch(v, j * k)
    prefetch(v_acc, j * ka)
    prefetch(v, j * k + k - 1)
    prefetch(v_acc, j * ka + ka - 1)


@jit_inline
def forward(
    a: int, c: int, b: int, indices: I32, values: F64, w0: float, lin: F64, v: F64, v_acc: F64,
    s: F64, q: F64, pf: I32, pa: int, pb: int,
) -> float:  # fmt: skip
    """Raw score y of features ``a:b``, of which ``c:b`` are linear only (crosses); leaves
    the per-factor sums ``s_f`` in ``s``.

    Meanwhile prefetches the lines of features ``pf[pa:pb]`` (the next example), one feature
    per feature computed: spread out, the prefetches overlap with the arithmetic instead of
    queueing up in one burst.
    """
    k = v.shape[1]
    for f in range(k):
        s[f] = 0.0
        q[f] = 0.0
    dot = 0.0
    for p in range(a, c):
        if pa < pb:
            prefetch_feature(pf[pa], lin, v, v_acc)
            pa += 1
        j = indices[p]
        x = values[p]
        dot += lin[j, LIN_W] * x
        for f in range(k):
            t = v[j, f] * x
            s[f] += t
            q[f] += t * t
    for p in range(c, b):
        dot += lin[indices[p], LIN_W] * values[p]
    for p in range(pa, pb):
        prefetch_feature(pf[p], lin, v, v_acc)
    inter = 0.0
    for f in range(k):
        inter += s[f] * s[f] - q[f]
    return w0 + dot + 0.5 * inter


@jit_inline
def exp_neg_abs(y: float) -> float:
    """exp(-|y|) of the clamped logit: p and dloss/dy both follow from it without overflow."""
    return math.exp(-abs(min(max(y, -LOGIT_CLAMP), LOGIT_CLAMP)))


@jit_inline
def proba(y: float, e: float) -> float:
    """sigmoid(y) from ``e = exp_neg_abs(y)``; strictly inside (0, 1)."""
    return 1.0 / (1.0 + e) if y >= 0.0 else e / (1.0 + e)


@jit_inline
def loss_gradient(y: float, e: float, label: int, clip: float) -> float:
    """d logloss / dy = p - label from ``e = exp_neg_abs(y)`` (no cancellation); clipped."""
    if label == 1:
        g = -e / (1.0 + e) if y >= 0.0 else -1.0 / (1.0 + e)
    else:
        g = 1.0 / (1.0 + e) if y >= 0.0 else e / (1.0 + e)
    return max(min(g, clip), -clip)


@jit_inline
def restore(
    a: int, n: int, nf: int, indices: I32, lin: F64, v: F64, v_acc: F64, bk_lin: F64,
    bk_v: F64, bk_va: F64, cols: int,
) -> None:  # fmt: skip
    """Undo a refused step; reverse order so a repeated bucket ends at its first backup.
    ``cols``: the ``lin`` columns the optimizer writes (FTRL's padding column never is);
    the first ``nf`` features have latents, the rest are linear only."""
    k = v.shape[1]
    ka = v_acc.shape[1]
    has_acc = v_acc.shape[0] > 0
    for i in range(n - 1, -1, -1):
        j = indices[a + i]
        for col in range(cols):
            lin[j, col] = bk_lin[i, col]
        if i >= nf:
            continue
        for f in range(k):
            v[j, f] = bk_v[i, f]
        if has_acc:
            for f in range(ka):
                v_acc[j, f] = bk_va[i, f]


@jit_inline
def latents_sgd(
    a: int, n: int, indices: I32, values: F64, g: float, lr: float, l2: float, v: F64, s: F64,
    bk_v: F64,
) -> bool:  # fmt: skip
    """river's latent step: v_jf -= lr * (g (x s_f - v_jf x^2) + l2 v_jf); False if non-finite."""
    k = v.shape[1]
    ok = True
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        xx = x * x
        for f in range(k):
            vf = v[j, f]
            bk_v[i, f] = vf
            vf -= lr * (g * (x * s[f] - vf * xx) + l2 * vf)
            v[j, f] = vf
            # x - x is 0 for finite x and NaN otherwise: a branch-free, vectorisable check.
            ok &= vf - vf == 0.0
    return ok


@jit_inline
def latents_adagrad(
    a: int, n: int, indices: I32, values: F64, g: float, lr: float, l2: float, eps: float,
    v: F64, v_acc: F64, s: F64, bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """AdaGrad step of every latent coordinate; gradients use the pre-step sums ``s``."""
    k = v.shape[1]
    ok = True
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        xx = x * x
        for f in range(k):
            vf = v[j, f]
            af = v_acc[j, f]
            bk_v[i, f] = vf
            bk_va[i, f] = af
            gv = g * (x * s[f] - vf * xx) + l2 * vf
            af += gv * gv
            vf -= lr / math.sqrt(af + eps) * gv
            v_acc[j, f] = af
            v[j, f] = vf
            ok &= (vf - vf) + (af - af) == 0.0
    return ok


@jit_inline
def ride_logistic(u0: float, c: float) -> float:
    """Where the logit ends when it follows the gradient flow of the logistic loss towards
    its label for "time" ``c`` (= rate x importance): the u solving u + e^u = u0 + e^u0 + c,
    with u the logit signed towards the label. Newton from the Euler step, which lies above
    the root of this convex equation, so it converges from above and never overshoots."""
    u0 = min(max(u0, -LOGIT_CLAMP), LOGIT_CLAMP)
    target = u0 + math.exp(u0) + c
    u = u0 + c / (1.0 + math.exp(u0))
    for _ in range(8):
        eu = math.exp(min(u, 700.0))
        h = u + eu - target
        u -= h / (1.0 + eu)
        if abs(h) < 1e-12 * (1.0 + abs(target)):
            break
    return u


@jit_inline
def learn_adaptive(
    a: int, c: int, b: int, indices: I32, values: F64, g0: float, w: float, z0: float, label: int,
    hp: F64, bias: F64, lin: F64, v: F64, v_acc: F64, s: F64, sd: F64, qd: F64, bk_lin: F64,
    bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """Vowpal Wabbit's default update (adaptive, normalized, importance-invariant), extended
    to the latents: per-coordinate AdaGrad rates, each feature's x taken relative to the
    largest |x| it has shown, the global rate scaled by how many features an example has,
    and the step taken as the exact flow of the logistic loss along the update direction
    (Karampatziakis & Langford 2011) rather than one Euler step: a high rate cannot overshoot
    the label, however many features move together."""
    lr_w = hp[HP_LR_W]
    lr_x = hp[HP_LR_X]
    lr_v = hp[HP_LR_V]
    lr_0 = hp[HP_LR_0]
    l2_w = hp[HP_L2_W]
    l2_v = hp[HP_L2_V]
    eps = hp[HP_EPS]
    n = b - a
    nf = c - a  # features with latents; the rest (crosses) are linear only
    k = v.shape[1]
    gg = w * g0 * g0
    # Pass 1: scales, squared-gradient sums, and how fast the logit moves per unit gradient.
    norm_x = 1.0  # the intercept's x = 1 at scale 1
    n0 = bias[B_N0] + gg
    bias[B_N0] = n0
    rate_0 = lr_0 / math.sqrt(n0 + eps)
    speed = rate_0
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        ax = abs(x)
        bk_lin[i, LIN_W] = lin[j, LIN_W]
        bk_lin[i, LIN_N] = lin[j, LIN_N]
        bk_lin[i, LIN_S] = lin[j, LIN_S]
        scale = lin[j, LIN_S]
        if ax > scale:
            if scale > 0.0:
                lin[j, LIN_W] *= scale / ax  # keep w x where it was at the new scale
            scale = ax
            lin[j, LIN_S] = ax
        if scale > 0.0:
            xs = x / scale
            lr = lr_w if i < nf else lr_x
            # A cross counts in the example's size as much as its rate says, so crosses at a
            # low rate leave the features' normalized step as it was without them.
            norm_x += xs * xs if i < nf else xs * xs * (lr_x / lr_w)
            nj = lin[j, LIN_N] + gg * x * x
            lin[j, LIN_N] = nj
            # VW's rate: 1 / (sqrt(sum of squared gradients) x scale): sqrt(G) grows like |x|,
            # and so does the damping eps is given, so a feature's scale never matters.
            speed += lr * x * x / (math.sqrt(nj + eps * scale * scale) * scale)
        for f in range(k if i < nf else 0):
            d = x * (s[f] - v[j, f] * x)  # d logit / d v_jf
            bk_v[i, f] = v[j, f]
            bk_va[i, f] = v_acc[j, f]
            af = v_acc[j, f] + gg * d * d
            v_acc[j, f] = af
            speed += lr_v / math.sqrt(af + eps) * d * d
    bias[B_NORM] += w * norm_x
    bias[B_TOTAL] += w
    multiplier = math.sqrt(bias[B_TOTAL] / bias[B_NORM])
    c = speed * multiplier * w
    # The logit's path under the flow towards the label, and the gradient integrated on it.
    if c < 1e-12:
        flow = w * g0
    else:
        toward = 1.0 if label == 1 else -1.0
        u1 = ride_logistic(toward * z0, c)
        flow = (toward * z0 - u1) * toward / (speed * multiplier)  # = integral of g dt
    step = multiplier * flow
    # The latents move the logit quadratically: with large steps the second-order term would
    # carry it past the flow's end. Shrink the whole step by alpha so it lands there.
    alpha = 1.0
    if k > 0:
        for f in range(k):
            sd[f] = 0.0
            qd[f] = 0.0
        for i in range(nf):
            j = indices[a + i]
            x = values[a + i]
            for f in range(k):
                dv = -lr_v / math.sqrt(v_acc[j, f] + eps) * step * x * (s[f] - v[j, f] * x)
                sd[f] += x * dv
                qd[f] += (x * dv) * (x * dv)
        quad = 0.0
        for f in range(k):
            quad += sd[f] * sd[f] - qd[f]
        quad *= 0.5
        first = -step * speed  # the first-order change of the logit: the flow's end
        if quad != 0.0 and first != 0.0:
            sign = 1.0 if first > 0.0 else -1.0
            aa = sign * first
            qq = sign * quad
            disc = aa * aa + 4.0 * qq * aa
            alpha = 2.0 * aa / (aa + math.sqrt(disc)) if disc >= 0.0 else -aa / (2.0 * qq)
            alpha = min(max(alpha, 0.0), 1.0)
    step *= alpha
    # Pass 2: every coordinate moves by its rate times its gradient, integrated.
    ok = True
    bias[B_W0] -= rate_0 * step
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        scale = lin[j, LIN_S]
        wj = lin[j, LIN_W]
        if scale > 0.0:
            rate = (lr_w if i < nf else lr_x) / (math.sqrt(lin[j, LIN_N] + eps * scale * scale)
                                                  * scale)  # fmt: skip
            wj -= rate * (step * x + multiplier * w * l2_w * wj)
            lin[j, LIN_W] = wj
        for f in range(k if i < nf else 0):
            vf = v[j, f]
            d = x * (s[f] - vf * x)
            vf -= lr_v / math.sqrt(v_acc[j, f] + eps) * (step * d + multiplier * w * l2_v * vf)
            v[j, f] = vf
            ok &= vf - vf == 0.0
        ok &= (wj - wj) + (lin[j, LIN_N] - lin[j, LIN_N]) == 0.0
    return ok


@jit_inline
def adam_coordinate(
    state: F64, w: int, m: int, sq: int, t: int, grad: float, lr: float
) -> float:  # fmt: skip
    """One lazy Adam step of the coordinate whose value, moments and step count sit at
    ``state[w]``, ``state[m]``, ``state[sq]``, ``state[t]``; returns the new value.

    Lazy: the moments decay only when the coordinate has a gradient, and the bias correction
    uses the coordinate's own step count, so a rare feature's first steps are full size."""
    steps = state[t] + 1.0
    state[t] = steps
    m1 = ADAM_BETA1 * state[m] + (1.0 - ADAM_BETA1) * grad
    m2 = ADAM_BETA2 * state[sq] + (1.0 - ADAM_BETA2) * grad * grad
    state[m] = m1
    state[sq] = m2
    m_hat = m1 / (1.0 - ADAM_BETA1**steps)
    v_hat = m2 / (1.0 - ADAM_BETA2**steps)
    value: float = state[w] - lr * m_hat / (math.sqrt(v_hat) + ADAM_EPS)
    return value


@jit_inline
def latents_adam(
    a: int, n: int, indices: I32, values: F64, g: float, lr: float, l2: float, lin: F64,
    v: F64, v_acc: F64, s: F64, bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """Lazy Adam on every latent coordinate: ``v_acc[j, :k]`` the second moments,
    ``v_acc[j, k:]`` the first; the bias correction uses the bucket's step count (``LIN_T``,
    already advanced by the linear step). Gradients use the pre-step sums ``s``."""
    k = v.shape[1]
    ok = True
    for i in range(n):
        j = indices[a + i]
        x = values[a + i]
        xx = x * x
        steps = lin[j, LIN_T]
        c1 = 1.0 - ADAM_BETA1**steps
        c2 = 1.0 - ADAM_BETA2**steps
        for f in range(k):
            vf = v[j, f]
            m2 = v_acc[j, f]
            m1 = v_acc[j, k + f]
            bk_v[i, f] = vf
            bk_va[i, f] = m2
            bk_va[i, k + f] = m1
            gv = g * (x * s[f] - vf * xx) + l2 * vf
            m1 = ADAM_BETA1 * m1 + (1.0 - ADAM_BETA1) * gv
            m2 = ADAM_BETA2 * m2 + (1.0 - ADAM_BETA2) * gv * gv
            vf -= lr * (m1 / c1) / (math.sqrt(m2 / c2) + ADAM_EPS)
            v_acc[j, f] = m2
            v_acc[j, k + f] = m1
            v[j, f] = vf
            ok &= (vf - vf) + (m1 - m1) + (m2 - m2) == 0.0
    return ok


@jit_inline
def learn(
    a: int, c: int, b: int, indices: I32, values: F64, g: float, opt: int, hp: F64, bias: F64,
    lin: F64, v: F64, v_acc: F64, s: F64, bk_bias: F64, bk_lin: F64, bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """One optimizer step on features ``a:b`` (``c:b`` linear only) with loss gradient ``g``.

    Order follows river (intercept, linear weights, latents); latent gradients use the sums
    ``s`` from the forward pass. Returns False, with the state untouched, if any new value
    would be NaN or infinite.
    """
    lr_0 = hp[HP_LR_0]
    l2_w = hp[HP_L2_W]
    eps = hp[HP_EPS]
    n = b - a
    nf = c - a  # crosses from here on: their weights step at ``HP_LR_X``
    ok = True
    if opt == OPT_SGD:
        # river's FM SGD is the textbook one (per-occurrence L2, own intercept step, no L2 on it).
        bias[B_W0] -= lr_0 * g
        for i in range(n):
            j = indices[a + i]
            wj = lin[j, LIN_W]
            bk_lin[i, LIN_W] = wj
            wj -= hp[HP_LR_W if i < nf else HP_LR_X] * (g * values[a + i] + l2_w * wj)
            lin[j, LIN_W] = wj
            ok &= wj - wj == 0.0
    elif opt == OPT_ADAM:
        bias[B_W0] = adam_coordinate(bias, B_W0, B_M0, B_N0, B_T0, g, lr_0)
        for i in range(n):
            j = indices[a + i]
            for col in range(4):
                bk_lin[i, col] = lin[j, col]
            gw = g * values[a + i] + l2_w * lin[j, LIN_W]
            wj = adam_coordinate(lin[j], LIN_W, LIN_M, LIN_N, LIN_T, gw,
                                 hp[HP_LR_W if i < nf else HP_LR_X])  # fmt: skip
            lin[j, LIN_W] = wj
            moments = lin[j, LIN_M] + lin[j, LIN_N]
            ok &= (wj - wj) + (moments - moments) == 0.0
    elif opt == OPT_ADAGRAD:
        n0 = bias[B_N0] + g * g
        bias[B_N0] = n0
        bias[B_W0] -= lr_0 / math.sqrt(n0 + eps) * g
        for i in range(n):
            j = indices[a + i]
            wj = lin[j, LIN_W]
            nj = lin[j, LIN_N]
            bk_lin[i, LIN_W] = wj
            bk_lin[i, LIN_N] = nj
            gw = g * values[a + i] + l2_w * wj
            nj += gw * gw
            wj -= hp[HP_LR_W if i < nf else HP_LR_X] / math.sqrt(nj + eps) * gw
            lin[j, LIN_N] = nj
            lin[j, LIN_W] = wj
            ok &= (nj - nj) + (wj - wj) == 0.0
    else:
        alpha = hp[HP_ALPHA]
        beta = hp[HP_BETA]
        l1_w = hp[HP_L1_W]
        if lr_0 > 0.0:
            # Intercept: FTRL-Proximal with alpha = intercept_learning_rate and no L1/L2.
            n0 = bias[B_N0]
            n0_new = n0 + g * g
            z0 = bias[B_Z0] + g - (math.sqrt(n0_new) - math.sqrt(n0)) / lr_0 * bias[B_W0]
            bias[B_N0] = n0_new
            bias[B_Z0] = z0
            bias[B_W0] = -z0 / ((beta + math.sqrt(n0_new)) / lr_0)
        for i in range(n):
            j = indices[a + i]
            gi = g * values[a + i]
            wj = lin[j, LIN_W]
            nj = lin[j, LIN_N]
            zj = lin[j, LIN_Z]
            bk_lin[i, LIN_W] = wj
            bk_lin[i, LIN_N] = nj
            bk_lin[i, LIN_Z] = zj
            nj_new = nj + gi * gi
            zj += gi - (math.sqrt(nj_new) - math.sqrt(nj)) / alpha * wj
            if abs(zj) <= l1_w:
                wj = 0.0
            else:
                sign = 1.0 if zj > 0.0 else -1.0
                wj = -(zj - sign * l1_w) / ((beta + math.sqrt(nj_new)) / alpha + l2_w)
            lin[j, LIN_N] = nj_new
            lin[j, LIN_Z] = zj
            lin[j, LIN_W] = wj
            ok &= (nj_new - nj_new) + (zj - zj) + (wj - wj) == 0.0
    lr_v = hp[HP_LR_V]
    l2_v = hp[HP_L2_V]
    n = nf
    if opt == OPT_SGD:
        ok &= latents_sgd(a, n, indices, values, g, lr_v, l2_v, v, s, bk_v)
    elif opt == OPT_ADAM:
        ok &= latents_adam(a, n, indices, values, g, lr_v, l2_v, lin, v, v_acc, s, bk_v, bk_va)
    else:
        ok &= latents_adagrad(a, n, indices, values, g, lr_v, l2_v, eps, v, v_acc, s, bk_v, bk_va)
    return ok


@jit_inline
def step(
    a: int, c: int, b: int, indices: I32, values: F64, g0: float, w: float, z0: float, label: int,
    opt: int, hp: F64, bias: F64, lin: F64, v: F64, v_acc: F64, s: F64, sd: F64, qd: F64,
    bk_bias: F64, bk_lin: F64, bk_v: F64, bk_va: F64,
) -> bool:  # fmt: skip
    """One learn step with loss gradient ``g0`` and importance ``w``; if any new value would be
    NaN or infinite, the state is put back as it was and False is returned."""
    for t in range(N_BIAS):
        bk_bias[t] = bias[t]
    if opt == OPT_ADAPTIVE:
        ok = learn_adaptive(a, c, b, indices, values, g0, w, z0, label, hp, bias, lin, v,
                            v_acc, s, sd, qd, bk_lin, bk_v, bk_va)  # fmt: skip
    else:
        ok = learn(a, c, b, indices, values, g0 * w, opt, hp, bias, lin, v, v_acc, s, bk_bias,
                   bk_lin, bk_v, bk_va)  # fmt: skip
    for t in range(N_BIAS):
        ok &= bias[t] - bias[t] == 0.0
    if not ok:
        for t in range(N_BIAS):
            bias[t] = bk_bias[t]
        cols = lin.shape[1] if opt == OPT_ADAM else min(lin.shape[1], LIN_Z + 1)
        restore(a, b - a, c - a, indices, lin, v, v_acc, bk_lin, bk_v, bk_va, cols)
    return ok


@jit_inline
def cross_bucket(x: int, y: int, n_buckets: int) -> int:
    """The bucket of the cross of buckets ``x`` and ``y`` (either order): splitmix64's
    finalizer of the pair, masked to the table (``n_buckets`` is a power of two)."""
    lo = np.uint64(min(x, y))
    hi = np.uint64(max(x, y))
    h = lo * np.uint64(0x9E3779B97F4A7C15) + hi
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
    return int(h & np.uint64(n_buckets - 1))


@jit_inline
def expand_crosses(
    a: int, b: int, indices: I32, values: F64, n_buckets: int, out_idx: I32, out_val: F64
) -> int:  # fmt: skip
    """Write features ``a:b`` and then every pair of them (x = x_i x_j, VW's ``-q``) to
    ``out_idx``/``out_val`` from position 0; returns the count written."""
    n = b - a
    for i in range(n):
        out_idx[i] = indices[a + i]
        out_val[i] = values[a + i]
    t = n
    for i in range(n):
        bi = indices[a + i]
        xi = values[a + i]
        for m in range(i + 1, n):
            out_idx[t] = cross_bucket(bi, indices[a + m], n_buckets)
            out_val[t] = xi * values[a + m]
            t += 1
    return t


@jit
def cross_buckets(indices: I32, n_buckets: int) -> I32:
    """The buckets of every pair of one example's features, in the order the kernel uses
    (``expand_crosses`` itself builds them)."""
    n = indices.shape[0]
    out_idx = np.empty(n + n * (n - 1) // 2, dtype=np.int32)
    expand_crosses(0, n, indices, np.ones(n), n_buckets, out_idx, np.empty(out_idx.shape[0]))
    return out_idx[n:].copy()


@jit
def run_ops(
    indptr: I64, indices: I32, values: F64, op_kind: I8, op_row: I64, op_label: I8,
    op_weight: F64, opt: int, hp: F64, bias: F64, lin: F64, v: F64, v_acc: F64, counters: I64,
    out: F64, crosses: bool,
) -> None:  # fmt: skip
    """Run every op in order; ``out[j]`` = p before op ``j`` ran. Call ``check_batch`` first.

    ``crosses``: each example also gets every pair of its features as a linear-only feature
    (``cross_bucket``), built into scratch arrays before its forward pass.

    A learn op's loss gradient is scaled by its importance weight, and for ``OP_LEARN_FNW``
    also by the fake-negative weight of the current p (see ``model.base.OP_LEARN_FNW``).

    A learn right after a score of the same row reuses that score's forward pass: nothing
    changed the model in between, so the result is bitwise the same and half the work.
    Each forward pass prefetches the cache lines of the next op's example.
    """
    k = v.shape[1]
    m = lin.shape[1]
    n_ops = op_kind.shape[0]
    n_rows = indptr.shape[0] - 1
    max_nnz = 0
    for r in range(n_rows):
        max_nnz = max(max_nnz, indptr[r + 1] - indptr[r])
    n_buckets = lin.shape[0]
    x_idx = indices
    x_val = values
    if crosses:
        max_nnz += max_nnz * (max_nnz - 1) // 2
        x_idx = np.empty(max_nnz, dtype=np.int32)
        x_val = np.empty(max_nnz)
    # Scratch, allocated once per batch rather than per op.
    s = np.empty(k)
    q = np.empty(k)
    sd = np.empty(k)
    qd = np.empty(k)
    bk_bias = np.empty(N_BIAS)
    bk_lin = np.empty((max_nnz, m))
    bk_v = np.empty((max_nnz, k))
    bk_va = np.empty((max_nnz, v_acc.shape[1]))
    clip = hp[HP_CLIP]
    # SGD has no latent accumulators: prefetch ``v`` twice rather than a bogus address.
    pf_acc = v_acc if v_acc.shape[0] > 0 else v
    cached_row = -1
    cached_y = 0.0
    cached_e = 0.0
    for j in range(n_ops):
        r = op_row[j]
        a = indptr[r]
        b = indptr[r + 1]
        c = b
        if crosses:  # the example's features, then their pairs, in the scratch arrays
            c = b - a
            if op_kind[j] != 0 and r == cached_row:
                b = c + c * (c - 1) // 2  # built for the score just before
            else:
                b = expand_crosses(a, b, indices, values, n_buckets, x_idx, x_val)
            a = 0
        if op_kind[j] != 0 and r == cached_row:
            y = cached_y
            e = cached_e
        else:
            # Prefetch the next op's example, skipping the usual learn of this same row.
            nxt = j + 1
            while nxt < n_ops and nxt < j + 4 and op_row[nxt] == r:
                nxt += 1
            pa = 0
            pb = 0
            if nxt < n_ops:
                pa = indptr[op_row[nxt]]
                pb = indptr[op_row[nxt] + 1]
            y = forward(a, c, b, x_idx, x_val, bias[B_W0], lin, v, pf_acc, s, q, indices, pa,
                        pb)  # fmt: skip
            e = exp_neg_abs(y)
        nan = math.isnan(y)
        if nan:
            # Only reachable with absurd inputs (e.g. x = 1e300); serve an uninformative p.
            out[j] = 0.5
            counters[C_NONFINITE] += 1
        else:
            out[j] = proba(y, e)
        if op_kind[j] == 0:
            cached_row = r
            cached_y = y
            cached_e = e
            continue
        cached_row = -1
        counters[C_LEARNED] += 1
        if not math.isfinite(y):
            counters[C_REFUSED] += 1
            continue
        label = op_label[j]
        g0 = loss_gradient(y, e, label, clip)
        w = op_weight[j]
        if op_kind[j] == 2:
            p = out[j]
            w *= (1.0 + p) if label == 1 else (1.0 - p) * (1.0 + p)
        if w == 0.0:
            continue  # a weight of zero: nothing to learn (and AdaGrad sums stay as they are)
        if not step(a, c, b, x_idx, x_val, g0, w, y, label, opt, hp, bias, lin, v, v_acc, s,
                    sd, qd, bk_bias, bk_lin, bk_v, bk_va):  # fmt: skip
            counters[C_REFUSED] += 1


@jit
def ftrl_z_for_weight(w: float, n: float, alpha: float, beta: float, l1: float, l2: float) -> float:
    """The FTRL ``z`` whose closed-form weight is ``w`` (used to set weights by hand)."""
    if w == 0.0:
        return 0.0
    sign = 1.0 if w > 0.0 else -1.0
    return -(w * ((beta + math.sqrt(n)) / alpha + l2) + sign * l1)
