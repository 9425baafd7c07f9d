"""Softmax attention of queries over any key set under the end rule (DESIGN.md
section 2): a query may use a key iff key.end <= query.end and both belong to
the same document.

Shapes: B batch, Q queries, S keys, H heads, K head width.

Two implementations compute the same function:

* `dense`: one [B, H, Q, S] score tensor under an explicit boolean mask. The
  reference, and the right choice for one decoding query over a cache.
* `blockwise`: queries and keys in chunks with an online (running max and
  running sum) softmax, so no score tensor larger than one chunk pair exists,
  forward or backward (a custom VJP recomputes each chunk pair's scores from
  the saved log-sum-exp). Which chunk pairs the end rule allows is decided from
  the static end positions when the function is traced: a pair no query can
  use is never computed. For causal self-attention that is about half of them.

Both return (output, log-sum-exp), so attention over disjoint key sets can be
merged exactly (`merge`, used by retina). A query whose keys are all masked
gets a zero output and a log-sum-exp of -inf: e.g. a fine position at the
start of a packed document, before its document has any complete coarse
block, reads nothing from the coarse scale.

Scores, the softmax statistics and the accumulators are float32 whatever the
input dtype; the two matmuls take their inputs in the input dtype (bfloat16
under mixed precision) and accumulate in float32.

On GPU, `cudnn` runs fine-scale causal self-attention through
`jax.nn.dot_product_attention` (cuDNN flash attention); every other mask falls
back to `blockwise` (`attend` decides, from the static ends, never from data).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("dense", "blockwise", "cudnn")
_F32 = jnp.float32
# The end position of padding keys: larger than any query's end, so never used.
FAR = 1 << 30


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which implementation, and the chunk sizes of the blockwise one."""

  kind: str = "blockwise"
  q_chunk: int = 256
  k_chunk: int = 256


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
  """bool [B, Q, S]: key.end <= query.end, within one document."""
  causal_QxS = jnp.asarray(k_end)[None, :] <= jnp.asarray(q_end)[:, None]
  return causal_QxS[None] & (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])


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


def _pad_len(x, n, value=0):
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                 constant_values=value)


def _blockwise_fn(p: Plan):
  """The custom-VJP attention for one static plan (closed over, not traced)."""
  cq, ck = p.q_chunk, p.k_chunk
  nq = len(p.kcount)
  # Numpy here, converted inside each traced function: an array made in one
  # trace (e.g. under remat) must not leak into the backward pass's trace.
  q_end_NxC = p.q_end.reshape(nq, cq)

  def chunks(x_BxQx, pad_value=0):
    """[B, Q, ...] -> [nq, B, cq, ...], padded."""
    x = _pad_len(x_BxQx, nq * cq, pad_value)
    return x.reshape(x.shape[0], nq, cq, *x.shape[2:]).swapaxes(0, 1)

  def unchunk(x_NxBxCx):
    x = x_NxBxCx.swapaxes(0, 1)
    return x.reshape(x.shape[0], nq * cq, *x.shape[3:])[:, :p.q_len]

  def key_chunk(j, k, v, k_seg):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, j * ck, ck, 1)  # noqa: E731
    k_end = jax.lax.dynamic_slice_in_dim(jnp.asarray(p.k_end), j * ck, ck, 0)
    return take(k), take(v), k_end, take(k_seg)

  def scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j):
    scale = q_i.shape[-1] ** -0.5
    s = jnp.einsum("bqhk,bshk->bhqs", q_i, k_j, preferred_element_type=_F32) * scale
    mask_BxQxS = (ke_j[None, :] <= qe_i[:, None])[None] & (qs_i[:, :, None] == ks_j[:, None, :])
    return jnp.where(mask_BxQxS[:, None], s, -jnp.inf)

  def pad_keys(k, v, k_seg):
    s_pad = len(p.k_end)
    return _pad_len(k, s_pad), _pad_len(v, s_pad), _pad_len(k_seg, s_pad, -2)

  def forward(q, k, v, q_seg, k_seg):
    k, v, k_seg = pad_keys(k, v, k_seg)
    b, h, dk = q.shape[0], q.shape[2], q.shape[3]

    def per_query_chunk(_, xs):
      q_i, qe_i, qs_i, kidx_i, kcount_i = xs

      def body(jj, st):
        m, l, acc = st
        k_j, v_j, ke_j, ks_j = key_chunk(kidx_i[jj], k, v, k_seg)
        s = scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = _finite_or_zero(m_new)
        pr = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)  # m = -inf (nothing yet) gives 0
        l = l * corr + pr.sum(-1)
        pv = jnp.einsum("bhqs,bshk->bqhk", pr.astype(v_j.dtype), v_j, preferred_element_type=_F32)
        acc = acc * corr.transpose(0, 2, 1)[..., None] + pv
        return m_new, l, acc

      init = (jnp.full((b, h, cq), -jnp.inf, _F32), jnp.zeros((b, h, cq), _F32),
              jnp.zeros((b, cq, h, dk), _F32))
      m, l, acc = jax.lax.fori_loop(0, kcount_i, body, init)
      o, lse = _normalise(acc, _finite_or_zero(m), l)
      return None, (o.astype(q.dtype), lse)

    xs = (chunks(q), jnp.asarray(q_end_NxC), chunks(q_seg, -1), jnp.asarray(p.kidx),
          jnp.asarray(p.kcount))
    _, (o, lse_NxBxHxC) = jax.lax.scan(per_query_chunk, None, xs)
    lse_BxQxH = unchunk(lse_NxBxHxC.transpose(0, 1, 3, 2))
    return unchunk(o), lse_BxQxH

  @jax.custom_vjp
  def attend_fn(q, k, v, q_seg, k_seg):
    return forward(q, k, v, q_seg, k_seg)

  def fwd(q, k, v, q_seg, k_seg):
    o, lse = forward(q, k, v, q_seg, k_seg)
    return (o, lse), (q, k, v, q_seg, k_seg, o, lse)

  def bwd(res, cotangents):
    q, k, v, q_seg, k_seg, o, lse = res
    do, dlse = cotangents
    s_len = k.shape[1]
    k, v, k_seg = pad_keys(k, v, k_seg)
    # d lse / d s = softmax, so a log-sum-exp cotangent enters like D below.
    d_BxQxH = (do.astype(_F32) * o.astype(_F32)).sum(-1) - dlse.astype(_F32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no keys: probabilities 0
    scale = q.shape[-1] ** -0.5

    def per_query_chunk(carry, xs):
      dk, dv = carry
      q_i, do_i, lse_i, d_i, qe_i, qs_i, kidx_i, kcount_i = xs
      lse_BxHxC, d_BxHxC = lse_i.transpose(0, 2, 1), d_i.transpose(0, 2, 1)

      def body(jj, st):
        dq_i, dk, dv = st
        j = kidx_i[jj]
        k_j, v_j, ke_j, ks_j = key_chunk(j, k, v, k_seg)
        pr = jnp.exp(scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j) - lse_BxHxC[..., None])
        dp = jnp.einsum("bqhk,bshk->bhqs", do_i, v_j, preferred_element_type=_F32)
        ds = (pr * (dp - d_BxHxC[..., None])).astype(q_i.dtype)
        dq_i = dq_i + jnp.einsum("bhqs,bshk->bqhk", ds, k_j, preferred_element_type=_F32)
        dk_j = jnp.einsum("bhqs,bqhk->bshk", ds, q_i, preferred_element_type=_F32)
        dv_j = jnp.einsum("bhqs,bqhk->bshk", pr.astype(do_i.dtype), do_i,
                          preferred_element_type=_F32)
        add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            acc, jax.lax.dynamic_slice_in_dim(acc, j * ck, ck, 1) + x, j * ck, 1)
        return dq_i, add(dk, dk_j), add(dv, dv_j)

      dq_i = jnp.zeros(q_i.shape, _F32)
      dq_i, dk, dv = jax.lax.fori_loop(0, kcount_i, body, (dq_i, dk, dv))
      return (dk, dv), dq_i * scale

    xs = (chunks(q), chunks(do), chunks(lse_safe), chunks(d_BxQxH), jnp.asarray(q_end_NxC),
          chunks(q_seg, -1), jnp.asarray(p.kidx), jnp.asarray(p.kcount))
    zeros = jnp.zeros(k.shape, _F32)
    (dk, dv), dq = jax.lax.scan(per_query_chunk, (zeros, zeros), xs)
    return (unchunk(dq).astype(q.dtype), (dk[:, :s_len] * scale).astype(k.dtype),
            dv[:, :s_len].astype(v.dtype), None, None)

  attend_fn.defvjp(fwd, bwd)
  return attend_fn


# ----------------------------------------------------------------------------
# Accelerator kernels.


def cudnn_eligible(q_end, k_end, dtype, head_dim: int) -> bool:
  """cuDNN flash attention expresses causal self-attention over one fine grid
  (ends 0, 1, 2, ... on both sides) in half precision; nothing else."""
  q_end, k_end = np.asarray(q_end), np.asarray(k_end)
  fine = np.arange(len(q_end))
  return (jax.default_backend() == "gpu" and len(q_end) == len(k_end)
          and np.array_equal(q_end, fine) and np.array_equal(k_end, fine)
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128)


def fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS, implementation=None):
  """Fine-scale causal self-attention with documents through
  `jax.nn.dot_product_attention` (`implementation="cudnn"` on GPU; tests run
  its XLA implementation on CPU). Returns the output only."""
  same_doc_Bx1xQxS = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask=same_doc_Bx1xQxS,
                                      is_causal=True, implementation=implementation)


# ----------------------------------------------------------------------------
# The entry point every block uses.


def attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
           cfg: AttentionConfig = AttentionConfig(), with_lse: bool = False):
  """End-rule attention with the configured implementation.

  Ends that are not static (traced, e.g. a decoding step's position) take the
  dense path; so does `dense`. `cudnn` is used only where `cudnn_eligible`.
  """
  static = isinstance(q_end, np.ndarray) and isinstance(k_end, np.ndarray)
  if cfg.kind == "dense" or not static:
    out = dense(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK,
                end_rule_mask(q_end, k_end, q_seg_BxQ, k_seg_BxS))
  elif (cfg.kind == "cudnn" and not with_lse
        and cudnn_eligible(q_end, k_end, q_BxQxHxK.dtype, q_BxQxHxK.shape[-1])):
    return fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS, "cudnn")
  else:
    out = blockwise(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
                    cfg.q_chunk, cfg.k_chunk)
  return out if with_lse else out[0]


def merge(*parts):
  """Attention over the union of disjoint key sets from each set's (output, lse)."""
  lse = functools.reduce(jnp.logaddexp, [lse for _, lse in parts])
  lse_safe = _finite_or_zero(lse)
  out = sum(o.astype(_F32) * jnp.exp(l - lse_safe)[..., None] for o, l in parts)
  return out.astype(parts[0][0].dtype), lse


def score_count(q_end, k_end, cfg: AttentionConfig) -> int:
  """(query, key) scores one sequence's head computes: every pair for `dense`,
  the allowed chunk pairs (padding included) for `blockwise`."""
  if cfg.kind == "dense":
    return len(q_end) * len(k_end)
  return plan(q_end, k_end, cfg.q_chunk, cfg.k_chunk).scores

