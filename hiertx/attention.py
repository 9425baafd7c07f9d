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

Accelerator kernels take fine-scale causal self-attention with documents (the
fine stacks of every model): on GPU `cudnn` runs it through
`jax.nn.dot_product_attention` (cuDNN flash attention), on TPU `splash` through
the Pallas splash-attention kernel. Every other mask goes `blockwise` (`attend`
decides from the static ends, never from data).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("dense", "blockwise", "cudnn", "splash")
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
  """bool [B, Q, S]: key.end <= query.end, within one document. Ends are [Q]
  and [S], or per row [B, Q] and [B, S] (content-grouped scales)."""
  q_end, k_end = jnp.asarray(q_end), jnp.asarray(k_end)
  q_end_BxQ = q_end if q_end.ndim == 2 else q_end[None]
  k_end_BxS = k_end if k_end.ndim == 2 else k_end[None]
  causal_BxQxS = k_end_BxS[:, None, :] <= q_end_BxQ[:, :, None]
  return causal_BxQxS & (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])


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


# Up to this many chunk pairs are laid out one after another in the program;
# more run in a scan over query chunks with a loop over each one's key chunks.
# The loops keep programs small at any length, and keep one pair's tensors
# alive at a time: laid out side by side, XLA:CPU recomputed several pairs'
# probabilities ahead of use (+26% peak memory for vanilla at 8 x 1024), for
# no measurable speed. One pair (short sequences) needs no loop.
UNROLL_PAIRS = 1


def _pair_scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j):
  """Scaled, masked float32 scores [B, H, cq, ck] of one chunk pair."""
  scale = q_i.shape[-1] ** -0.5
  s = jnp.einsum("bqhk,bshk->bhqs", q_i, k_j, preferred_element_type=_F32) * scale
  mask_BxQxS = (ke_j[None, :] <= qe_i[:, None])[None] & (qs_i[:, :, None] == ks_j[:, None, :])
  return jnp.where(mask_BxQxS[:, None], s, -jnp.inf)


def _forward_pair(st, q_i, qe_i, qs_i, k_j, v_j, ke_j, ks_j):
  """The online softmax state (running max, running sum, accumulator) after
  one more key chunk."""
  m, l, acc = st
  s = _pair_scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j)
  m_new = jnp.maximum(m, s.max(-1))
  m_safe = _finite_or_zero(m_new)
  pr = jnp.exp(s - m_safe[..., None])
  corr = jnp.exp(m - m_safe)  # m = -inf (nothing yet) gives 0
  pv = jnp.einsum("bhqs,bshk->bqhk", pr.astype(v_j.dtype), v_j, preferred_element_type=_F32)
  return m_new, l * corr + pr.sum(-1), acc * corr.transpose(0, 2, 1)[..., None] + pv


def _backward_pair(q_i, do_i, lse_i, d_i, qe_i, qs_i, k_j, v_j, ke_j, ks_j):
  """Gradient contributions of one chunk pair: (dq_i, dk_j, dv_j), float32,
  before the 1/sqrt(K) score scale (applied once at the end)."""
  pr = jnp.exp(_pair_scores(q_i, qe_i, qs_i, k_j, ke_j, ks_j) - lse_i[..., None])
  dp = jnp.einsum("bqhk,bshk->bhqs", do_i, v_j, preferred_element_type=_F32)
  ds = (pr * (dp - d_i[..., None])).astype(q_i.dtype)
  return (jnp.einsum("bhqs,bshk->bqhk", ds, k_j, preferred_element_type=_F32),
          jnp.einsum("bhqs,bqhk->bshk", ds, q_i, preferred_element_type=_F32),
          jnp.einsum("bhqs,bqhk->bshk", pr.astype(do_i.dtype), do_i, preferred_element_type=_F32))


def _blockwise_fn(p: Plan):
  """The custom-VJP attention for one static plan (closed over, not traced)."""
  cq, ck = p.q_chunk, p.k_chunk
  nq, nk = len(p.kcount), len(p.k_end) // ck
  unrolled = p.pairs <= UNROLL_PAIRS
  # Numpy here, converted inside each traced function: an array made in one
  # trace (e.g. under remat) must not leak into the backward pass's trace.
  q_end_NxC, k_end_MxC = p.q_end.reshape(nq, cq), p.k_end.reshape(nk, ck)

  def pad(x, n, value=0):
    return _pad_len(x, n, value)

  def split(x, n, c):
    """[B, n c, ...] -> [n, B, c, ...]."""
    return x.reshape(x.shape[0], n, c, *x.shape[2:]).swapaxes(0, 1)

  def merge(x, length):
    """[n, B, c, ...] -> [B, length, ...]."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]

  def padded(q, k, v, q_seg, k_seg, *per_query):
    """Everything cut into chunks: queries [nq, ...], keys [nk, ...]."""
    qs = [split(pad(x, nq * cq), nq, cq) for x in (q, *per_query)]
    q_seg = split(pad(q_seg, nq * cq, -1), nq, cq)
    ks = [split(pad(x, nk * ck), nk, ck) for x in (k, v)]
    k_seg = split(pad(k_seg, nk * ck, -2), nk, ck)
    return qs, q_seg, ks, k_seg

  def keys_of(i):
    return [int(j) for j in p.kidx[i, :p.kcount[i]]]

  def forward(q, k, v, q_seg, k_seg):
    b, h, dk = q.shape[0], q.shape[2], q.shape[3]
    (q_c,), qs_c, (k_c, v_c), ks_c = padded(q, k, v, q_seg, k_seg)
    init = (jnp.full((b, h, cq), -jnp.inf, _F32), jnp.zeros((b, h, cq), _F32),
            jnp.zeros((b, cq, h, dk), _F32))

    def finish(st):
      m, l, acc = st
      o, lse = _normalise(acc, _finite_or_zero(m), l)
      return o.astype(q.dtype), lse.transpose(0, 2, 1)

    if unrolled:
      outs = []
      for i in range(nq):
        st = init
        for j in keys_of(i):
          st = _forward_pair(st, q_c[i], q_end_NxC[i], qs_c[i], k_c[j], v_c[j], k_end_MxC[j],
                             ks_c[j])
        outs.append(finish(st))
      o, lse = (jnp.stack(x) for x in zip(*outs))
    else:
      k_end = jnp.asarray(k_end_MxC)

      def per_query_chunk(_, xs):
        q_i, qe_i, qs_i, kidx_i, kcount_i = xs

        def body(jj, st):
          j = kidx_i[jj]
          return _forward_pair(st, q_i, qe_i, qs_i, k_c[j], v_c[j], k_end[j], ks_c[j])

        return None, finish(jax.lax.fori_loop(0, kcount_i, body, init))

      xs = (q_c, jnp.asarray(q_end_NxC), qs_c, jnp.asarray(p.kidx), jnp.asarray(p.kcount))
      _, (o, lse) = jax.lax.scan(per_query_chunk, None, xs)
    return merge(o, p.q_len), merge(lse, p.q_len)

  @jax.custom_vjp
  def attend_fn(q, k, v, q_seg, k_seg):
    return forward(q, k, v, q_seg, k_seg)

  def fwd(q, k, v, q_seg, k_seg):
    o, lse = forward(q, k, v, q_seg, k_seg)
    return (o, lse), (q, k, v, q_seg, k_seg, o, lse)

  def bwd(res, cotangents):
    q, k, v, q_seg, k_seg, o, lse = res
    do, dlse = cotangents
    # d lse / d s = softmax, so a log-sum-exp cotangent enters like D below.
    d_BxQxH = (do.astype(_F32) * o.astype(_F32)).sum(-1) - dlse.astype(_F32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no keys: probabilities 0
    (q_c, do_c, lse_c, d_c), qs_c, (k_c, v_c), ks_c = padded(q, k, v, q_seg, k_seg, do,
                                                             lse_safe, d_BxQxH)
    lse_c, d_c = lse_c.swapaxes(2, 3), d_c.swapaxes(2, 3)  # [nq, B, H, cq]
    if unrolled:
      dq, dk, dv = [], [None] * nk, [None] * nk
      for i in range(nq):
        dq_i = jnp.zeros(q_c[i].shape, _F32)
        for j in keys_of(i):
          dq_ij, dk_j, dv_j = _backward_pair(q_c[i], do_c[i], lse_c[i], d_c[i], q_end_NxC[i],
                                             qs_c[i], k_c[j], v_c[j], k_end_MxC[j], ks_c[j])
          dq_i = dq_i + dq_ij
          dk[j] = dk_j if dk[j] is None else dk[j] + dk_j
          dv[j] = dv_j if dv[j] is None else dv[j] + dv_j
        dq.append(dq_i)
      zeros = jnp.zeros(k_c[0].shape, _F32)
      dq = jnp.stack(dq)
      dk = jnp.stack([zeros if x is None else x for x in dk])
      dv = jnp.stack([zeros if x is None else x for x in dv])
    else:
      k_end = jnp.asarray(k_end_MxC)

      def per_query_chunk(carry, xs):
        dk, dv = carry
        q_i, do_i, lse_i, d_i, qe_i, qs_i, kidx_i, kcount_i = xs

        def body(jj, st):
          dq_i, dk, dv = st
          j = kidx_i[jj]
          dq_ij, dk_j, dv_j = _backward_pair(q_i, do_i, lse_i, d_i, qe_i, qs_i, k_c[j], v_c[j],
                                             k_end[j], ks_c[j])
          return dq_i + dq_ij, dk.at[j].add(dk_j), dv.at[j].add(dv_j)

        dq_i, dk, dv = jax.lax.fori_loop(0, kcount_i, body,
                                         (jnp.zeros(q_i.shape, _F32), dk, dv))
        return (dk, dv), dq_i

      zeros = jnp.zeros(k_c.shape, _F32)
      xs = (q_c, do_c, lse_c, d_c, jnp.asarray(q_end_NxC), qs_c, jnp.asarray(p.kidx),
            jnp.asarray(p.kcount))
      (dk, dv), dq = jax.lax.scan(per_query_chunk, (zeros, zeros), xs)
    scale = q.shape[-1] ** -0.5
    return ((merge(dq, p.q_len) * scale).astype(q.dtype),
            (merge(dk, p.k_len) * scale).astype(k.dtype), merge(dv, p.k_len).astype(v.dtype),
            None, None)

  attend_fn.defvjp(fwd, bwd)
  return attend_fn


# ----------------------------------------------------------------------------
# Accelerator kernels.


def cudnn_eligible(q_end, k_end, dtype, head_dim: int, backend: str | None = None) -> bool:
  """cuDNN flash attention expresses causal self-attention over one fine grid
  (ends 0, 1, 2, ... on both sides) in half precision; nothing else."""
  q_end, k_end = np.asarray(q_end), np.asarray(k_end)
  fine = np.arange(len(q_end))
  return ((backend or _backend()) == "gpu" and len(q_end) == len(k_end)
          and np.array_equal(q_end, fine) and np.array_equal(k_end, fine)
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128)


def fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS, implementation=None):
  """Fine-scale causal self-attention with documents through
  `jax.nn.dot_product_attention` (`implementation="cudnn"` on GPU; tests run
  its XLA implementation on CPU). Returns the output only."""
  same_doc_Bx1xQxS = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask=same_doc_Bx1xQxS,
                                      is_causal=True, implementation=implementation)


def _backend() -> str:
  return jax.default_backend()


# The splash kernel's query and key block: lengths must be multiples of it.
SPLASH_BLOCK = 128


def splash_eligible(q_end, k_end, backend: str | None = None) -> bool:
  """The splash kernel gets causal self-attention over one fine grid whose
  length is a multiple of its block, on TPU; nothing else."""
  q_end, k_end = np.asarray(q_end), np.asarray(k_end)
  fine = np.arange(len(q_end))
  return ((backend or _backend()) == "tpu" and len(q_end) % SPLASH_BLOCK == 0
          and np.array_equal(q_end, fine) and np.array_equal(k_end, fine))


def _splash_kernel(heads: int, length: int, interpret: bool):
  """A causal splash-attention kernel for [heads, length, K] (one sequence).
  Built inside each trace: a kernel keeps arrays made while tracing, so one
  cached across traces would leak tracers."""
  # Imported here: the Pallas TPU package is only needed where the kernel runs.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
  b = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret), sk.SegmentIds


def splash_causal(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, seg_BxT, interpret: bool | None = None):
  """Fine-scale causal self-attention with documents through the Pallas
  splash-attention kernel; the output only. Under a mesh (`jax.sharding.set_mesh`)
  each device runs the kernel on its own rows and heads (`shard_map` over the
  batch axes and `tensor`), since the partitioner cannot split a kernel call.
  `interpret` (default: off TPU) runs the kernel's reference interpreter."""
  if interpret is None:
    interpret = jax.devices()[0].platform != "tpu"
  scale = q_BxTxHxK.shape[-1] ** -0.5

  def local(q, k, v, seg):
    kernel, segment_ids = _splash_kernel(q.shape[2], q.shape[1], interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(q=s, kv=s))  # noqa: E731
    # The kernel does not scale its queries.
    q = (q.astype(_F32) * scale).astype(q.dtype)
    return heads_first(jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), seg))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, seg_BxT)
  P = jax.sharding.PartitionSpec
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
  heads = "tensor" if ("tensor" in mesh.axis_names
                       and q_BxTxHxK.shape[2] % mesh.shape["tensor"] == 0) else None
  spec = P(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                       out_specs=spec, check_vma=False)(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK,
                                                        seg_BxT)


# ----------------------------------------------------------------------------
# The entry point every block uses.


def attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
           cfg: AttentionConfig = AttentionConfig(), with_lse: bool = False):
  """End-rule attention with the configured implementation.

  Ends that are not static (traced, e.g. a decoding step's position) take the
  dense path; so does `dense`. `cudnn` is used only where `cudnn_eligible`,
  `splash` only where `splash_eligible`; other masks run `blockwise`.
  """
  static = isinstance(q_end, np.ndarray) and isinstance(k_end, np.ndarray)
  if cfg.kind == "dense" or not static:
    out = dense(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK,
                end_rule_mask(q_end, k_end, q_seg_BxQ, k_seg_BxS))
  elif (cfg.kind == "cudnn" and not with_lse
        and cudnn_eligible(q_end, k_end, q_BxQxHxK.dtype, q_BxQxHxK.shape[-1])):
    return fused_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ, k_seg_BxS, "cudnn")
  elif cfg.kind == "splash" and not with_lse and splash_eligible(q_end, k_end):
    # Self-attention: the query and key documents are the same.
    return splash_causal(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxQ)
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

