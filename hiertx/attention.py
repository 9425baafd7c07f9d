"""Softmax attention of queries over any key set under the end rule (docs/design.md
section 2): a query may use a key iff key.end <= query.end and both belong to
the same document.

Shapes: B batch, Q queries, S keys, H heads, K head width.

Two implementations compute the same function:

* `dense`: one [B, H, Q, S] score tensor under an explicit boolean mask. The
  reference, and the right choice for one decoding query over a cache.
* `blockwise`: queries and keys in chunks. Which chunk pairs the end rule
  allows is decided from the static end positions when the function is
  traced: a pair no query can use is never computed (for causal
  self-attention about half of them). The allowed pairs are computed in
  batches, each a few batched matmuls over all its pairs, combined by an
  online (running max and running sum) softmax: no loops, so no pair waits
  for another on an accelerator, and no score tensor larger than one batch
  (`BATCH_SCORES`) exists, forward or backward (a custom VJP recomputes the
  scores from the saved log-sum-exp).

Both return (output, log-sum-exp), so attention over disjoint key sets can be
merged exactly (`merge`, used by retina). A query whose keys are all masked
gets a zero output and a log-sum-exp of -inf: e.g. a fine position at the
start of a packed document, before its document has any complete coarse
block, reads nothing from the coarse scale.

Scores, the softmax statistics and the accumulators are float32 whatever the
input dtype; the two matmuls take their inputs in the input dtype (bfloat16
under mixed precision) and accumulate in float32.

Accelerator kernels: `pallas` (GPU) runs every site, whatever its scales,
static or per-row ends, with its log-sum-exp where a caller merges key sets,
through the end-rule flash kernel of `hiertx.flash`. Same-scale causal
self-attention with documents (queries and keys sharing one strictly
increasing set of ends: the stacks of every model at every scale) also runs on
`cudnn` (GPU, `jax.nn.dot_product_attention`); `splash` (TPU, the Pallas
splash-attention kernel) runs every site with static ends and lengths that are
multiples of its block (cross-scale attention too, the rule as its static
block-sparse mask). `choose` decides per call site from the static
ends, never from data, and records what each site got (`record_sites`); a
site a kernel cannot take runs `AttentionConfig.fallback` (e.g. cuDNN for the
stacks and `pallas` for the rest), or is refused.
"""

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hiertx import flash
from hiertx.errors import ConfigError

KINDS = ("dense", "blockwise", "cudnn", "splash", "pallas")
# Accelerator kernels: a site one of them cannot take is refused (`error`) or
# runs the configured fallback.
KERNELS = ("cudnn", "splash", "pallas")
FALLBACKS = ("error", "blockwise", "dense", "pallas")
# What packed rows (several documents, masked from each other) run under
# `cudnn`: the kernel that takes segment ids, or cuDNN with a document bias.
CUDNN_PACKED = ("pallas", "mask")
_F32 = jnp.float32
# The end position of padding keys: larger than any query's end, so never used.
FAR = 1 << 30


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which implementation, the chunk sizes of the blockwise one, and what a
  site the chosen kernel cannot take runs instead (`error`: nothing)."""

  kind: str = "blockwise"
  q_chunk: int = 256
  k_chunk: int = 256
  fallback: str = "error"
  # The Pallas kernel's launch on GPUs (0: chosen by block size and dtype,
  # hiertx.flash.launch).
  warps: int = 0
  stages: int = 0
  # "masked": documents of a packed row never see each other; "visible"
  # (data.cross_document_attention): a row is one causal sequence.
  documents: str = "masked"
  cudnn_packed: str = "pallas"  # CUDNN_PACKED


# ----------------------------------------------------------------------------
# The dense reference.


def dense(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxQxS):
  """(output [B, Q, H, K], log-sum-exp [B, Q, H] float32) under a boolean mask."""
  scale = q_BxQxHxK.shape[-1] ** -0.5
  s_BxHxQxS = jnp.einsum("bqhk,bshk->bhqs", q_BxQxHxK, k_BxSxHxK,
                         preferred_element_type=_F32) * scale
  s_BxHxQxS = jnp.where(mask_BxQxS[:, None], s_BxHxQxS, -jnp.inf)
  m_BxHxQ = _finite_or_zero(s_BxHxQxS.max(-1))
  p_BxHxQxS = jnp.exp(s_BxHxQxS - m_BxHxQ[..., None])
  l_BxHxQ = p_BxHxQxS.sum(-1)
  o_BxQxHxK = jnp.einsum("bhqs,bshk->bqhk", p_BxHxQxS.astype(v_BxSxHxK.dtype), v_BxSxHxK,
                         preferred_element_type=_F32)
  o_BxQxHxK, lse_BxHxQ = _normalise(o_BxQxHxK, m_BxHxQ, l_BxHxQ)
  return o_BxQxHxK.astype(q_BxQxHxK.dtype), lse_BxHxQ.transpose(0, 2, 1)


def _finite_or_zero(m):
  # A row with no allowed key has max -inf; subtracting 0 keeps exp() at 0.
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _normalise(acc_BxQxHxK, m_BxHxQ, l_BxHxQ):
  """Output = accumulator / row sum (zero where no key was allowed), and lse."""
  has = l_BxHxQ > 0
  l_safe = jnp.where(has, l_BxHxQ, 1.0)
  o = acc_BxQxHxK / l_safe.transpose(0, 2, 1)[..., None]
  return o, jnp.where(has, m_BxHxQ + jnp.log(l_safe), -jnp.inf)


def end_rule_mask(q_end, k_end, q_seg_BxQ, k_seg_BxS):
  """bool [B, Q, S]: key.end <= query.end, within one document. Ends are [Q]
  and [S], or per row [B, Q] and [B, S] (content-grouped scales)."""
  q_end, k_end = jnp.asarray(q_end), jnp.asarray(k_end)
  q_end_BxQ = q_end if q_end.ndim == 2 else q_end[None]
  k_end_BxS = k_end if k_end.ndim == 2 else k_end[None]
  return ends_allow(q_end_BxQ, k_end_BxS) & (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])


def ends_allow(q_end_xQ, k_end_xS):
  """bool [..., Q, S]: the end rule without documents, key.end <= query.end
  (numpy or jax arrays; from numpy ends, the static masks kernels take)."""
  return k_end_xS[..., None, :] <= q_end_xQ[..., :, None]


# ----------------------------------------------------------------------------
# The blockwise path.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static chunking of one attention call: which key chunks each query chunk
  reads (`kidx[i, :kcount[i]]`), decided from the end positions alone."""

  q_chunk: int
  k_chunk: int
  q_len: int
  k_len: int
  q_end: np.ndarray  # int32 [nq * q_chunk], padding queries end at -1
  k_end: np.ndarray  # int32 [nk * k_chunk], padding keys end at FAR
  kidx: np.ndarray  # int32 [nq, max_count]
  kcount: np.ndarray  # int32 [nq]

  @property
  def pairs(self) -> int:
    """Chunk pairs computed."""
    return int(self.kcount.sum())

  @property
  def scores(self) -> int:
    """(query, key) scores computed per sequence and head, padding included."""
    return self.pairs * self.q_chunk * self.k_chunk


def plan(q_end: np.ndarray, k_end: np.ndarray, q_chunk: int, k_chunk: int) -> Plan:
  """The chunk pairs a blockwise attention with these static ends computes."""
  q_end, k_end = np.asarray(q_end, np.int64), np.asarray(k_end, np.int64)
  cq, ck = min(q_chunk, len(q_end)), min(k_chunk, len(k_end))
  nq, nk = -(-len(q_end) // cq), -(-len(k_end) // ck)
  qe = np.full(nq * cq, -1, np.int64)
  qe[:len(q_end)] = q_end
  ke = np.full(nk * ck, FAR, np.int64)
  ke[:len(k_end)] = k_end
  q_max = qe.reshape(nq, cq).max(1)
  k_min = ke.reshape(nk, ck).min(1)
  needed = k_min[None, :] <= q_max[:, None]
  kcount = needed.sum(1).astype(np.int32)
  kidx = np.zeros((nq, max(1, int(kcount.max()))), np.int32)
  for i in range(nq):
    js = np.nonzero(needed[i])[0]
    kidx[i, :len(js)] = js
  return Plan(cq, ck, len(q_end), len(k_end), qe.astype(np.int32), ke.astype(np.int32),
              kidx, kcount)


def blockwise(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
              q_chunk: int = 256, k_chunk: int = 256):
  """(output, log-sum-exp) of the end-rule attention, chunk pair by chunk pair.

  `q_end` and `k_end` must be static (numpy): they decide the chunk pairs.
  """
  p = plan(q_end, k_end, q_chunk, k_chunk)
  return _blockwise_fn(p)(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ.astype(jnp.int32),
                          k_seg_BxS.astype(jnp.int32))


# Chunk pairs are computed in batches of at most this many float32 scores
# (batch x heads x pairs x chunk x chunk), by backend: each batch is a few
# batched matmuls over all its pairs, and the batches follow one another in
# the program. No loops, so no pair waits for another inside a batch, while
# at most one batch's score tensors are alive at a time. On CPU, 2**22 scores
# (16 MiB): causal attention's forward and backward ran 1.2-1.3x faster than
# the loops over chunk pairs this replaced (2**20 a little faster still, but
# with twice the program to compile). Accelerators want few, large batches
# (2**27 scores: 512 MiB).
BATCH_SCORES = {"cpu": 1 << 22, "gpu": 1 << 27, "tpu": 1 << 27}
# At most this many batches per call, so that programs (and compile times)
# stay bounded at any length: long sequences get larger batches.
MAX_BATCHES = 32


def pairs_per_batch(pairs: int, batch: int, heads: int, pair_scores: int,
                    backend: str | None = None) -> int:
  """How many of `pairs` chunk pairs (`pair_scores` scores per sequence and
  head each) one batch computes at most (`BATCH_SCORES`, `MAX_BATCHES`)."""
  backend = backend or _backend()
  budget = BATCH_SCORES[backend] if backend in BATCH_SCORES else max(BATCH_SCORES.values())
  size = max(1, budget // (batch * heads * pair_scores), -(-pairs // MAX_BATCHES))
  return min(pairs, size) if pairs else 1


def pair_batches(p: Plan, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The plan's chunk pairs as batches (query chunks, key chunks) of at most
  `size` pairs: whole query chunks (all their key chunks) where they fit, one
  query chunk's key chunks over several batches where alone they do not."""
  out, qi, kj = [], [], []

  def flush():
    if qi:
      out.append((np.asarray(qi, np.int32), np.asarray(kj, np.int32)))
      qi.clear()
      kj.clear()

  for i in range(len(p.kcount)):
    js = [int(j) for j in p.kidx[i, :p.kcount[i]]]
    if len(qi) + len(js) > size:
      flush()
    for start in range(0, len(js), size):
      if len(js) > size:
        flush()
      part = js[start:start + size]
      qi.extend([i] * len(part))
      kj.extend(part)
  flush()
  return out


def _pair_scores(q_P, qe_P, qs_P, k_P, ke_P, ks_P):
  """Scaled, masked float32 scores [P, B, H, cq, ck] of P chunk pairs:
  queries [P, B, H, cq, K] (ends [P, cq], documents [P, B, cq]) against keys
  [P, B, H, ck, K] (ends [P, ck], documents [P, B, ck])."""
  scale = q_P.shape[-1] ** -0.5
  s = jnp.einsum("pbhqk,pbhsk->pbhqs", q_P, k_P, preferred_element_type=_F32) * scale
  causal_Px1xQxS = (ke_P[:, None, :] <= qe_P[:, :, None])[:, None]
  same_doc_PxBxQxS = qs_P[..., :, None] == ks_P[..., None, :]
  return jnp.where((causal_Px1xQxS & same_doc_PxBxQxS)[:, :, None], s, -jnp.inf)


def _take(x_N, idx):
  """Rows `idx` (static) of a chunked array [n, ...]: the array itself, a
  slice, or a gather."""
  if np.array_equal(idx, np.arange(x_N.shape[0])):
    return x_N
  if np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
    return x_N[int(idx[0]):int(idx[0]) + len(idx)]
  return x_N[jnp.asarray(idx)]


def _sum_into(x_P, idx, n: int):
  """[n, ...]: row r is the sum of the rows of `x_P` [P, ...] with idx == r
  (static). A matmul with a 0/1 matrix, which is exact (each output is a sum
  of the same float32 terms) and, unlike a scatter, fast on every backend."""
  if np.array_equal(idx, np.arange(n)):
    return x_P
  onehot_NxP = jnp.asarray(np.arange(n)[:, None] == idx[None, :], x_P.dtype)
  flat = x_P.reshape(x_P.shape[0], -1)
  return jnp.dot(onehot_NxP, flat, precision=jax.lax.Precision.HIGHEST).reshape(
      n, *x_P.shape[1:])


def _after(x, previous):
  """`x`, made to wait for `previous` (None: nothing to wait for). Batches of
  chunk pairs are independent, and a scheduler free to run them in any order
  may hold many batches' tensors at once (XLA:CPU does); adding 0 x (a sum of
  `previous`) orders them (floating-point x * 0 is not folded away)."""
  if previous is None:
    return x
  return x + (previous.sum() * 0).astype(x.dtype)


def _max_into(x_P, idx, n: int):
  """[n, ...]: row r is the maximum of the rows of `x_P` with idx == r
  (static, sorted)."""
  if np.array_equal(idx, np.arange(n)):
    return x_P
  return jax.ops.segment_max(x_P, jnp.asarray(idx), n, indices_are_sorted=True)


def _local(idx):
  """(sorted distinct values of `idx`, each entry's position among them)."""
  rows = np.unique(idx)
  return rows, np.searchsorted(rows, idx)


def _set_rows(x_N, value, rows):
  """[n, ...] with rows `rows` (static, sorted, distinct) set to `value`: an
  in-place update of a slice where they are contiguous."""
  if rows[-1] - rows[0] + 1 == len(rows):
    return jax.lax.dynamic_update_slice_in_dim(x_N, value.astype(x_N.dtype), int(rows[0]), 0)
  return x_N.at[jnp.asarray(rows)].set(value.astype(x_N.dtype))


def _combine(a, b):
  """Online-softmax states (max [.., H, cq], sum, accumulator [.., H, cq, K])
  of query chunks over two disjoint key sets, as one."""
  (m1, l1, acc1), (m2, l2, acc2) = a, b
  m = jnp.maximum(m1, m2)
  m_safe = _finite_or_zero(m)
  c1, c2 = jnp.exp(m1 - m_safe), jnp.exp(m2 - m_safe)  # -inf (no keys) gives 0
  return m, l1 * c1 + l2 * c2, acc1 * c1[..., None] + acc2 * c2[..., None]


def _blockwise_fn(p: Plan):
  """The custom-VJP attention for one static plan (closed over, not traced)."""
  cq, ck = p.q_chunk, p.k_chunk
  nq, nk = len(p.kcount), len(p.k_end) // ck
  # Numpy here, converted inside each traced function: an array made in one
  # trace (e.g. under remat) must not leak into the backward pass's trace.
  q_end_NxC, k_end_MxC = p.q_end.reshape(nq, cq), p.k_end.reshape(nk, ck)

  def batches(b, h):
    return pair_batches(p, pairs_per_batch(p.pairs, b, h, cq * ck))

  def split(x, n, c):
    """[B, n c, H, ...] -> [n, B, H, c, ...] (heads first: no batch of pairs
    transposes anything); [B, n c] -> [n, B, c]."""
    x = x.reshape(x.shape[0], n, c, *x.shape[2:]).swapaxes(0, 1)
    return x.swapaxes(2, 3) if x.ndim > 3 else x

  def merge(x, length):
    """The inverse of `split`, cut to `length`."""
    x = (x.swapaxes(2, 3) if x.ndim > 3 else x).swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]

  def padded(q, k, v, q_seg, k_seg, *per_query):
    """Everything cut into chunks: queries [nq, ...], keys [nk, ...]."""
    qs = [split(flash.pad_length(x, nq * cq), nq, cq) for x in (q, *per_query)]
    q_seg = split(flash.pad_length(q_seg, nq * cq, -1), nq, cq)
    ks = [split(flash.pad_length(x, nk * ck), nk, ck) for x in (k, v)]
    k_seg = split(flash.pad_length(k_seg, nk * ck, -2), nk, ck)
    return qs, q_seg, ks, k_seg

  def scores(qi, kj, q_P, qs_c, k_c, ks_c):
    return _pair_scores(q_P, q_end_NxC[qi], _take(qs_c, qi), _take(k_c, kj),
                        k_end_MxC[kj], _take(ks_c, kj))

  def forward(q, k, v, q_seg, k_seg):
    b, h, dk = q.shape[0], q.shape[2], q.shape[3]
    (q_c,), qs_c, (k_c, v_c), ks_c = padded(q, k, v, q_seg, k_seg)
    # Online softmax state of every query chunk: max [nq, B, H, cq], sum, and
    # accumulator [nq, B, H, cq, K]; a chunk no batch reaches keeps output 0
    # and lse -inf.
    state = (jnp.full((nq, b, h, cq), -jnp.inf, _F32), jnp.zeros((nq, b, h, cq), _F32),
             jnp.zeros((nq, b, h, cq, dk), _F32))
    seen, last = set(), None
    for qi, kj in batches(b, h):
      rows, local = _local(qi)
      s = scores(qi, kj, _after(_take(q_c, qi), last), qs_c, k_c, ks_c)
      m = _max_into(s.max(-1), local, len(rows))
      pr = jnp.exp(s - _take(_finite_or_zero(m), local)[..., None])
      pv = jnp.einsum("pbhqs,pbhsk->pbhqk", pr.astype(v.dtype), _take(v_c, kj),
                      preferred_element_type=_F32)
      new = (m, _sum_into(pr.sum(-1), local, len(rows)), _sum_into(pv, local, len(rows)))
      if seen.intersection(rows.tolist()):  # a query chunk split over batches
        new = _combine(tuple(_take(x, rows) for x in state), new)
      state = tuple(_set_rows(x, y, rows) for x, y in zip(state, new))
      seen.update(rows.tolist())
      last = new[1]
    m, l, acc = state
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    lse = jnp.where(has, _finite_or_zero(m) + jnp.log(l_safe), -jnp.inf)
    return merge((acc / l_safe[..., None]).astype(q.dtype), p.q_len), merge(lse, p.q_len)

  @jax.custom_vjp
  def attend_fn(q, k, v, q_seg, k_seg):
    return forward(q, k, v, q_seg, k_seg)

  def fwd(q, k, v, q_seg, k_seg):
    o, lse = forward(q, k, v, q_seg, k_seg)
    return (o, lse), (q, k, v, q_seg, k_seg, o, lse)

  def bwd(res, cotangents):
    do, dlse = cotangents
    q, k, v, q_seg, k_seg, o, lse = res
    b, h = q.shape[0], q.shape[2]
    # d lse / d s = softmax, so a log-sum-exp cotangent enters like D below.
    d_BxQxH = (do.astype(_F32) * o.astype(_F32)).sum(-1) - dlse.astype(_F32)
    # No keys: probabilities 0, and D finite (a merge of two empty key sets
    # hands such a row a NaN lse cotangent; p * (dp - D) must stay 0).
    d_BxQxH = jnp.where(jnp.isfinite(lse), d_BxQxH, 0.0)
    # The scores are recomputed from q and k, both known since the forward
    # pass: a scheduler may recompute them (or share the forward's per-pair
    # copies of k and v) early and keep them until this backward runs, for
    # every layer at once (XLA:CPU does, and drops optimization barriers
    # before scheduling). Made to wait for the cotangent, they cannot.
    q, k, v = (_after(x, d_BxQxH) for x in (q, k, v))
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no keys: probabilities 0
    (q_c, do_c, lse_c, d_c), qs_c, (k_c, v_c), ks_c = padded(q, k, v, q_seg, k_seg, do,
                                                             lse_safe, d_BxQxH)
    # Gradients of every chunk, summed over the batches that reach it.
    dq, dk, dv = (jnp.zeros(x.shape, _F32) for x in (q_c, k_c, v_c))
    last = None
    for qi, kj in batches(b, h):
      (rows, local), (cols, klocal) = _local(qi), _local(kj)
      q_P, do_P = _after(_take(q_c, qi), last), _after(_take(do_c, qi), last)
      k_P, v_P = _take(k_c, kj), _take(v_c, kj)
      pr = jnp.exp(scores(qi, kj, q_P, qs_c, k_c, ks_c) - _take(lse_c, qi)[..., None])
      dp = jnp.einsum("pbhqk,pbhsk->pbhqs", do_P, v_P, preferred_element_type=_F32)
      ds = (pr * (dp - _take(d_c, qi)[..., None])).astype(q.dtype)
      dq_R = _sum_into(jnp.einsum("pbhqs,pbhsk->pbhqk", ds, k_P, preferred_element_type=_F32),
                       local, len(rows))
      dk_C = _sum_into(jnp.einsum("pbhqs,pbhqk->pbhsk", ds, q_P, preferred_element_type=_F32),
                       klocal, len(cols))
      dv_C = _sum_into(jnp.einsum("pbhqs,pbhqk->pbhsk", pr.astype(do.dtype), do_P,
                                  preferred_element_type=_F32), klocal, len(cols))
      dq = _set_rows(dq, _take(dq, rows) + dq_R, rows)
      dk = _set_rows(dk, _take(dk, cols) + dk_C, cols)
      dv = _set_rows(dv, _take(dv, cols) + dv_C, cols)
      last = dq_R

    scale = q.shape[-1] ** -0.5  # applied once here, not per pair
    return ((merge(dq, p.q_len) * scale).astype(q.dtype),
            (merge(dk, p.k_len) * scale).astype(k.dtype), merge(dv, p.k_len).astype(v.dtype),
            None, None)

  attend_fn.defvjp(fwd, bwd)
  return attend_fn


# ----------------------------------------------------------------------------
# Accelerator kernels.


def same_scale(q_end, k_end) -> bool:
  """Whether queries and keys share one strictly increasing set of ends: then
  the end rule is causal in index order (plus documents), at any scale."""
  q_end, k_end = np.asarray(q_end), np.asarray(k_end)
  return (q_end.ndim == 1 and np.array_equal(q_end, k_end)
          and bool(np.all(np.diff(q_end) > 0)))


def cudnn_refusal(q_end, k_end, dtype, head_dim: int, with_lse: bool = False,
                  backend: str | None = None, masked_form: bool = True) -> str:
  """Why cuDNN flash attention cannot take a site ('' if it can): it runs
  same-scale causal self-attention (`same_scale`) in half precision on GPU,
  at head widths and lengths jax's cuDNN binding accepts (checked here, at
  trace time, instead of failing to compile)."""
  if (backend or _backend()) != "gpu":
    return f"cuDNN runs on GPUs, this is {backend or _backend()}"
  if not same_scale(q_end, k_end):
    return "keys are not the queries' own scale"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"{jnp.dtype(dtype).name} (cuDNN takes bfloat16 or float16)"
  if head_dim > 128 or head_dim % 8:
    return f"head width {head_dim} (cuDNN takes multiples of 8 up to 128)"
  if masked_form and len(q_end) % 2:
    # Documents reach cuDNN as a bias, whose training kernels take even lengths only.
    return f"{len(q_end)} queries (cuDNN's masked form takes even lengths)"
  if with_lse:
    return "the caller merges the log-sum-exp"
  return ""


def fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ=None, k_seg_BxS=None,
                 implementation=None):
  """Causal self-attention of one scale through `jax.nn.dot_product_attention`
  (`implementation="cudnn"` on GPU; tests run its XLA implementation on CPU),
  with documents as a [B, 1, Q, S] mask (which jax hands cuDNN as a bias, and
  whose gradient the backward pass writes too), or none without segment
  ids. Returns the output only."""
  mask = None if q_seg_BxQ is None else (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                      is_causal=True, implementation=implementation)


def one_document_rows(seg_BxL) -> jax.Array:
  """bool []: every row holds one document, then only padding (segment 0),
  so causal attention without any mask is the end rule for its real
  queries (padding queries' outputs are never used)."""
  live = seg_BxL != 0
  same = jnp.all(jnp.where(live, seg_BxL == seg_BxL[:, :1], True))
  return same & jnp.all(live[:, 1:] <= live[:, :-1])


def cudnn_route(q_len: int, head_dim: int, dtype, cfg: AttentionConfig,
                backend: str | None = None) -> tuple[str, str]:
  """(route, site note) of a same-scale site under `cudnn`: "visible" (no
  mask: documents see each other), or, with documents masked, what packed
  rows run ("pallas": segment ids in the kernel; "mask": cuDNN with a
  document bias) while rows holding one document run cuDNN without a mask."""
  if cfg.documents == "visible":
    return "visible", "no mask: documents see each other"
  route, forced = cfg.cudnn_packed, ""
  if route == "pallas":
    forced = pallas_refusal(head_dim, backend, dtype, q_len, q_len, cfg)
    route = "mask" if forced else route
  packed = ("pallas (segment ids)" if route == "pallas" else
            f"cuDNN with a [B, 1, {q_len}, {q_len}] document bias"
            + (f", pallas cannot: {forced}" if forced else ""))
  return route, f"no mask for one-document rows; packed rows -> {packed}"


def _cudnn_implementation():
  # Off a GPU (tests), jax's XLA implementation of the same call, as the
  # Pallas kernel runs in its interpreter there.
  return None if _pallas_interpret() else "cudnn"


def _backend() -> str:
  return jax.default_backend()


# The splash kernel's query and key block: lengths must be multiples of it.
SPLASH_BLOCK = 128


def splash_refusal(q_end, k_end, with_lse: bool = False, backend: str | None = None) -> str:
  """Why the splash kernel cannot take a site ('' if it can): it runs any
  static ends (the end rule as the kernel's block-sparse mask) whose query
  and key lengths are multiples of its block, on TPU."""
  if (backend or _backend()) != "tpu":
    return f"splash runs on TPUs, this is {backend or _backend()}"
  for what, ends in (("query", q_end), ("key", k_end)):
    if len(ends) % SPLASH_BLOCK:
      return f"{what} length {len(ends)} is not a multiple of {SPLASH_BLOCK}"
  if with_lse:
    return "the caller merges the log-sum-exp"
  return ""


# A sink logit for the splash kernel: a key every query has, of value 0 and
# weight exp(-1e30 - max) = 0, so a query that no key is allowed gets output
# 0 (as `dense` gives it) instead of 0/0, and adds nothing to any other.
_SPLASH_SINK = -1e30


@dataclasses.dataclass(frozen=True)
class StaticMask:
  """A static bool [Q, S] mask, known by a small hashable `key` (what it is
  made from); `build()` makes the array."""

  key: tuple
  build: Callable[[], np.ndarray] = dataclasses.field(compare=False, hash=False)


@functools.cache
def _keyed_mask_type():
  """The splash package's NumpyMask, compared and hashed by a `StaticMask`
  key instead of its whole array."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class KeyedMask(sm.NumpyMask):
    key: tuple

    def __eq__(self, other):
      return isinstance(other, KeyedMask) and other.key == self.key

    def __hash__(self):
      return hash(self.key)

  return KeyedMask


@functools.lru_cache(maxsize=4)  # a model has a few distinct masks; each is [Q, S] bools
def _splash_numpy_mask(mask: StaticMask):
  """The splash package's mask for `mask`, built once per key. The package
  caches its block analysis by mask, and a plain mask hashes (and compares)
  its whole [Q, S] array on every lookup: seconds per layer at 8k tokens."""
  keyed = _keyed_mask_type()(np.asarray(mask.build(), bool))
  keyed.key = mask.key
  return keyed


def _splash_kernel(heads: int, mask: StaticMask | None, length: int, interpret: bool):
  """A splash-attention kernel for [heads, Q, K] x [heads, S, K] (one
  sequence): causal over `length` when `mask` is None, else that static mask
  (its all-false blocks skipped). Built inside each trace: a kernel keeps
  arrays made while tracing, so one cached across traces would leak
  tracers."""
  # Imported here: the Pallas TPU package is only needed where the kernel runs.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = sm.CausalMask((length, length)) if mask is None else _splash_numpy_mask(mask)
  b = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, interpret=interpret), sk.SegmentIds


def splash_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                  interpret: bool | None = None):
  """End-rule attention with documents (static ends) through the Pallas
  splash-attention kernel; the output only."""
  q_end, k_end = np.asarray(q_end), np.asarray(k_end)
  mask = None if same_scale(q_end, k_end) else StaticMask(
      ("ends", q_end.tobytes(), k_end.tobytes()), lambda: ends_allow(q_end, k_end))
  return splash_masked(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask, q_seg_BxQ, k_seg_BxS, interpret)


def splash_masked(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask: StaticMask | None, q_seg_BxQ,
                  k_seg_BxS, interpret: bool | None = None):
  """Attention through the Pallas splash-attention kernel under the static
  `mask` (None: causal, queries and keys one sequence) and documents; the
  output only. Under a mesh (`jax.sharding.set_mesh`) each device runs the
  kernel on its own rows and heads (`per_device`). `interpret` (default: off
  TPU) runs the kernel's reference interpreter."""
  if interpret is None:
    interpret = jax.devices()[0].platform != "tpu"
  scale = q_BxQxHxK.shape[-1] ** -0.5
  # Causal: every query has itself, so no sink is needed.
  sink = None if mask is None else _SPLASH_SINK

  def local(q, k, v, q_seg, k_seg):
    kernel, segment_ids = _splash_kernel(q.shape[2], mask, q.shape[1], interpret)
    sinks = None if sink is None else jnp.full((q.shape[2],), sink, _F32)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)

    def one(q, k, v, q_seg, k_seg):
      return kernel(q, k, v, segment_ids=segment_ids(q=q_seg, kv=k_seg), sinks=sinks)

    # The kernel does not scale its queries.
    q = (q.astype(_F32) * scale).astype(q.dtype)
    return heads_first(jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v),
                                     q_seg, k_seg))

  return per_device(local, q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS,
                    out_ranks=4)


def per_device(fn, *args, out_ranks):
  """`fn(*args)`, where under a mesh (`jax.sharding.set_mesh`) each device runs
  it on its own rows and heads (`shard_map` over the batch axes and `tensor`):
  the partitioner cannot split a kernel call. Arrays are split by rank:
  [B, L, H, K] by rows and heads, [B, L, H] likewise, [B, L] by rows; the
  first argument's heads decide whether heads are split. `out_ranks`: an int,
  or a tuple for several outputs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  P = jax.sharding.PartitionSpec
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
  heads = "tensor" if ("tensor" in mesh.axis_names
                       and args[0].shape[2] % mesh.shape["tensor"] == 0) else None
  spec = lambda rank: P(*(batch, None, heads, None)[:rank])
  outs = (tuple(spec(r) for r in out_ranks) if isinstance(out_ranks, tuple)
          else spec(out_ranks))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(jnp.ndim(a)) for a in args),
                       out_specs=outs, check_vma=False)(*args)


def _pallas_interpret() -> bool:
  # Off a GPU the kernel runs in Pallas's interpreter (tests on CPU).
  return jax.devices()[0].platform != "gpu"


def gpu_capability() -> str | None:
  """The first device's compute capability ("9.0"), where it has one."""
  return getattr(jax.devices()[0], "compute_capability", None)


def pallas_launch(q_len: int, k_len: int, head_dim: int, dtype, cfg: AttentionConfig,
                  capability: str | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
  """((block_q, block_k), (num_warps, num_stages)) of one Pallas site."""
  blocks = flash.block_sizes(q_len, k_len, cfg.q_chunk, cfg.k_chunk)
  return blocks, flash.launch(*blocks, head_dim, dtype, capability or gpu_capability(),
                              cfg.warps, cfg.stages)


def pallas_refusal(head_dim: int, backend: str | None = None, dtype=jnp.bfloat16,
                   q_len: int = 0, k_len: int = 0, cfg: AttentionConfig | None = None,
                   capability: str | None = None) -> str:
  """Why the Pallas end-rule kernel cannot run here ('' if it can): it lowers
  to Triton, for GPUs, at head widths Triton's matmuls take, with blocks
  whose tiles fit the GPU's shared memory (checked at trace time, so a site
  that cannot run falls back or errs with this reason, never fails to
  compile). In Pallas's interpreter (tests off GPUs) nothing is lowered,
  so no GPU limit applies."""
  backend = backend or _backend()
  if backend != "gpu":
    return f"the Pallas end-rule kernel runs on GPUs, this is {backend}"
  if _pallas_interpret():
    return ""
  cfg = cfg or AttentionConfig("pallas")
  capability = capability or gpu_capability()
  (bq, bk), (_, stages) = pallas_launch(q_len, k_len, head_dim, dtype, cfg, capability)
  return flash.gpu_refusal(head_dim, dtype, bq, bk, capability, stages if cfg.stages else 0)


def pallas_note(dtype) -> str:
  """What a site line says of a Pallas site in `dtype`."""
  if jnp.dtype(dtype) == jnp.float32:
    return "float32: IEEE matmuls, no tensor cores; model.dtype=bfloat16 uses them"
  return ""


def pallas_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                  cfg: AttentionConfig, q_lo=None):
  """(output, log-sum-exp) of any site through `flash.attend` (`q_lo`: static
  lower bounds of the keys' ends, retina's windows), per device under a mesh.
  Static ends are closed over; per-row ends travel with the rows."""
  static = isinstance(q_end, np.ndarray) and isinstance(k_end, np.ndarray)
  # Traced ends as [B, L], so that a mesh splits them with their rows.
  ends = () if static else tuple(jnp.broadcast_to(jnp.asarray(e), s.shape) for e, s in
                                 zip((q_end, k_end), (q_seg_BxQ, k_seg_BxS)))

  _, launch_ws = pallas_launch(q_seg_BxQ.shape[1], k_seg_BxS.shape[1], q_BxQxHxK.shape[-1],
                               q_BxQxHxK.dtype, cfg)

  def local(q, k, v, q_seg, k_seg, *row_ends):
    qe, ke = row_ends if row_ends else (q_end, k_end)
    return flash.attend(q, k, v, qe, ke, q_seg, k_seg, cfg.q_chunk, cfg.k_chunk,
                        interpret=_pallas_interpret(), q_lo=q_lo, launch_ws=launch_ws)

  return per_device(local, q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS, *ends,
                    out_ranks=(4, 3))


# ----------------------------------------------------------------------------
# The entry point every block uses.


@dataclasses.dataclass(frozen=True)
class Site:
  """One attention call of a model and the implementation it got."""

  name: str  # the calling module's path, e.g. body/pre_0/attn
  queries: int
  keys: int
  implementation: str
  why: str = ""  # why not the configured kind

  def text(self) -> str:
    why = f" ({self.why})" if self.why else ""
    return f"{self.name}: {self.queries} queries x {self.keys} keys -> {self.implementation}{why}"


_SITES: list | None = None


@contextlib.contextmanager
def record_sites():
  """Collects the `Site` of every attention call traced inside (a list)."""
  global _SITES
  outer, _SITES = _SITES, []
  try:
    yield _SITES
  finally:
    _SITES = outer


def choose(site: str, q_end, k_end, dtype, head_dim: int, cfg: AttentionConfig,
           with_lse: bool = False, backend: str | None = None) -> str:
  """The implementation one site runs under `cfg` (and records it): the
  configured kind where it can run; where a kernel cannot, its fallback, or
  a ConfigError naming the site. Ends that are not static (per-row content
  groups, a decoding step) run `dense`."""
  static = isinstance(q_end, np.ndarray) and isinstance(k_end, np.ndarray)
  why, note = "", ""
  if cfg.kind == "cudnn" and static:
    route, note = cudnn_route(len(q_end), head_dim, dtype, cfg, backend)
    why = cudnn_refusal(q_end, k_end, dtype, head_dim, with_lse, backend, route == "mask")
  elif cfg.kind == "splash":
    why = splash_refusal(q_end, k_end, with_lse, backend) if static else ""
  elif cfg.kind == "pallas":
    why = pallas_refusal(head_dim, backend, dtype, np.shape(q_end)[-1], np.shape(k_end)[-1], cfg)
  if not static and cfg.kind not in ("dense", "pallas"):
    why = why or "per-row ends"
  queries, keys = np.shape(q_end)[-1], np.shape(k_end)[-1]
  kind = fallback(cfg, site, queries, keys, why, head_dim, backend, dtype) if why else cfg.kind
  if kind == "blockwise" and not static:
    kind = "dense"  # the blockwise plan needs static ends
  note = pallas_note(dtype) if kind == "pallas" else (note if kind == "cudnn" else "")
  note_site(site, queries, keys, kind, "; ".join(filter(None, (why, note))))
  return kind


def fallback(cfg: AttentionConfig, site: str, queries: int, keys: int, why: str,
             head_dim: int, backend: str | None = None, dtype=jnp.bfloat16) -> str:
  """What a site that `cfg.kind` cannot run (`why`) runs instead: the
  configured fallback, or (`error`, or a `pallas` fallback that cannot run
  here either) a ConfigError naming the site."""
  if cfg.kind not in KERNELS:
    return cfg.kind
  if cfg.fallback == "error":
    raise ConfigError("model.attention", f"{cfg.kind} cannot run {site or 'a site'} "
                      f"({queries} queries x {keys} keys): {why}; set "
                      "model.attention_fallback=pallas (or blockwise, dense) to run such "
                      "sites so")
  refusal = (pallas_refusal(head_dim, backend, dtype, queries, keys, cfg)
             if cfg.fallback == "pallas" else "")
  if refusal:
    raise ConfigError("model.attention_fallback", f"pallas cannot run {site or 'a site'} "
                      f"({queries} queries x {keys} keys) either: {refusal}")
  return cfg.fallback


def note_site(site: str, queries: int, keys: int, implementation: str, why: str = "") -> None:
  """Records one attention call where `record_sites` listens."""
  if _SITES is not None:
    _SITES.append(Site(site, int(queries), int(keys), implementation, why))


def sites_text(sites) -> list[str]:
  """One line per kind of site: sites whose names differ only in layer
  indices and that got the same implementation for the same lengths are one
  line (e.g. `pre_1/block_{0..25}/attn ... [x26]`)."""
  groups = {}
  for s in dict.fromkeys(sites):  # a scanned stack is traced more than once
    key = dataclasses.replace(s, name=re.sub(r"_\d+(?=/|$)", "_*", s.name))
    groups.setdefault(key, []).append(s.name.split("/"))
  lines = []
  for key, names in groups.items():
    parts = []
    for segs in zip(*names):
      if len(set(segs)) == 1:
        parts.append(segs[0])
      else:
        stem = segs[0].rsplit("_", 1)[0]
        nums = sorted({int(x.rsplit("_", 1)[1]) for x in segs})
        parts.append(f"{stem}_{{{nums[0]}..{nums[-1]}}}")
    count = f" [x{len(names)}]" if len(names) > 1 else ""
    lines.append(dataclasses.replace(key, name="/".join(parts)).text() + count)
  return lines


def attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
           cfg: AttentionConfig = AttentionConfig(), with_lse: bool = False, site: str = ""):
  """End-rule attention with the implementation `choose` gives this site:
  `cudnn` and `splash` where the kernel can run it, `pallas` on GPUs,
  `blockwise` and `dense` anywhere (dense wherever the ends are not static)."""
  kind = choose(site, q_end, k_end, q_BxQxHxK.dtype, q_BxQxHxK.shape[-1], cfg, with_lse)
  if kind == "cudnn":
    return cudnn_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                        cfg)
  if kind == "splash":
    return splash_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS)
  if kind == "pallas":
    out = pallas_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                        cfg)
  elif kind == "dense":
    out = dense(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK,
                end_rule_mask(q_end, k_end, q_seg_BxQ, k_seg_BxS))
  else:
    out = blockwise(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                    cfg.q_chunk, cfg.k_chunk)
  return out if with_lse else out[0]


def cudnn_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                 cfg: AttentionConfig):
  """A same-scale site on cuDNN by its `cudnn_route`: without a mask where
  documents see each other or every row holds one document; packed rows
  otherwise through the Pallas kernel or cuDNN's masked form."""
  q_len, head_dim = q_BxQxHxK.shape[1], q_BxQxHxK.shape[-1]
  route, _ = cudnn_route(q_len, head_dim, q_BxQxHxK.dtype, cfg)
  impl = _cudnn_implementation()
  plain = lambda: fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, implementation=impl)
  if route == "visible":
    return plain()
  if route == "mask":
    packed = lambda: fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ,
                                  k_seg_BxS, impl)
  else:
    packed = lambda: pallas_attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end,
                                   q_seg_BxQ, k_seg_BxS, cfg)[0]
  # Decided per batch on the device: only the branch taken runs.
  return jax.lax.cond(one_document_rows(q_seg_BxQ), plain, packed)


def merge(*parts):
  """Attention over the union of disjoint key sets from each set's (output, lse)."""
  lse = functools.reduce(jnp.logaddexp, [lse for _, lse in parts])
  lse_safe = _finite_or_zero(lse)
  out = sum(o.astype(_F32) * jnp.exp(l - lse_safe)[..., None] for o, l in parts)
  return out.astype(parts[0][0].dtype), lse


def score_count(q_end, k_end, cfg: AttentionConfig) -> int:
  """(query, key) scores one sequence's head computes: every pair for `dense`,
  the allowed blocks (padding included) for `pallas`, the allowed chunk pairs
  for `blockwise` (and, as the closest static count, the other kernels)."""
  if cfg.kind == "dense":
    return len(q_end) * len(k_end)
  if cfg.kind == "pallas":
    bq, bk = flash.block_sizes(len(q_end), len(k_end), cfg.q_chunk, cfg.k_chunk)
    return int(flash.static_needed(q_end, None, k_end, bq, bk).sum()) * bq * bk
  return plan(q_end, k_end, cfg.q_chunk, cfg.k_chunk).scores

