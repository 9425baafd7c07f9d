"""The end rule (docs/design.md section 2) as one Pallas flash-attention kernel:
every attention site of every model, whatever its query and key scales.

Shapes: B batch, Q queries, S keys, H heads, K head width; queries and keys
are cut into blocks of `block_q` and `block_k` (nq and nk blocks).

* Block-sparse: which key blocks each query block reads is decided before the
  kernel runs, from the block's end and document ranges (`block_plan`), and the
  kernel loops over that list only, so a forbidden block is never loaded. With
  static ends the list's length is static (the end rule's blocks); documents
  (data) shorten it per row at run time.
* Inside a block the rule is applied per element: key.end <= query.end and the
  same document. Ends are static ([Q] and [S]) or per row ([B, Q], [B, S]:
  content-grouped scales). An optional lower bound per query (`q_lo`: also
  key.end > q_lo) makes a window: one level of retina's regions.
* Returns (output [B, Q, H, K], log-sum-exp [B, Q, H] float32); a query with no
  allowed key gets output 0 and lse -inf, as `attention.dense` does, so sites
  that merge key sets (retina) can use it.
* The backward pass is two more kernels (dq by query block over its key
  blocks; dk and dv by key block over the query blocks that read it), from
  the saved log-sum-exp: no score tensor outside a block exists.

It lowers to Triton on GPUs (`jax.experimental.pallas` GPU backend); tests run
it in Pallas's interpreter on CPU (`interpret=True`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_F32 = jnp.float32
# Padding: a padded query ends before every key, a padded key after every query.
_Q_PAD_END, _K_PAD_END = -1, 1 << 30
# The lower bound of a query without one: below every key's end.
_NO_LO = -(1 << 30)
# Larger blocks do not fit a GPU's shared memory at head width 128.
MAX_BLOCK = 128
# Triton's matmuls need every block dimension to be a power of two >= 16.
MIN_BLOCK = 16


# Shared memory one block may use (bytes), by compute capability: what the
# launch must fit its pipelined tiles into. Unknown GPUs get the smallest.
SHARED_MEMORY = {"9.0": 227 << 10, "8.0": 163 << 10, "8.7": 163 << 10, "8.6": 99 << 10,
                 "8.9": 99 << 10}
MIN_SHARED_MEMORY = 99 << 10


def shared_memory(capability: str | None) -> int:
  return SHARED_MEMORY.get(capability or "", MIN_SHARED_MEMORY)


def shared_memory_need(block_q: int, block_k: int, head_dim: int, dtype, stages: int) -> int:
  """Bytes of shared memory the largest of the three kernels asks for: its
  resident tiles, plus `stages` buffers of the tiles its loop loads (Triton
  pipelines each loop-carried load that many deep), plus the probability
  tile the second matmul reads."""
  size = jnp.dtype(dtype).itemsize
  fwd = block_q * head_dim + stages * 2 * block_k * head_dim  # q; k, v per step
  dq = 2 * block_q * head_dim + stages * 2 * block_k * head_dim  # q, do; k, v
  dkv = 2 * block_k * head_dim + stages * 2 * block_q * head_dim  # k, v; q, do
  return size * (max(fwd, dq, dkv) + block_q * block_k)


def launch(block_q: int, block_k: int, head_dim: int, dtype, capability: str | None = None,
           warps: int = 0, stages: int = 0) -> tuple[int, int]:
  """(num_warps, num_stages) of the kernels; 0 picks by shape:
  * warps: 8 where a step's tiles are large (128 x 64 scores or more at head
    width >= 64), so each warp holds a manageable slice of the accumulator;
    4 below, where 8 would leave warps idle.
  * stages: 3 for half precision (tensor-core matmuls finish fast, so loads
    need the deeper pipeline to keep up), 2 for float32; then fewer while
    the tiles would not fit the GPU's shared memory (`gpu_refusal` refuses
    blocks that do not fit even with 1)."""
  if not warps:
    warps = 8 if block_q * block_k >= 128 * 64 and head_dim >= 64 else 4
  if not stages:
    stages = 3 if jnp.dtype(dtype).itemsize == 2 else 2
    budget = shared_memory(capability)
    while stages > 1 and shared_memory_need(block_q, block_k, head_dim, dtype, stages) > budget:
      stages -= 1
  return warps, stages


def gpu_refusal(head_dim: int, dtype=jnp.bfloat16, block_q: int = MIN_BLOCK,
                block_k: int = MIN_BLOCK, capability: str | None = None, stages: int = 0) -> str:
  """Why the kernel cannot take a site on GPU ('' if it can): a head width
  Triton's matmuls cannot tile, or blocks whose tiles do not fit the GPU's
  shared memory at `stages` (0: as few as `launch` would go, one)."""
  if head_dim < MIN_BLOCK or head_dim & (head_dim - 1):
    return f"head width {head_dim} is not a power of two >= {MIN_BLOCK}"
  if head_dim > MAX_BLOCK:
    return f"head width {head_dim} > {MAX_BLOCK}"
  need = shared_memory_need(block_q, block_k, head_dim, dtype, stages or 1)
  have = shared_memory(capability)
  if need > have:
    return (f"{block_q} x {block_k} blocks at head width {head_dim} in "
            f"{jnp.dtype(dtype).name} with {stages or 1} stage(s) need {need >> 10} KiB of "
            f"shared memory, this GPU ({capability or 'unknown'}) has {have >> 10} KiB: lower "
            "model.attention_q_chunk / attention_k_chunk (or attention_stages)")
  return ""


def block_sizes(q_len: int, k_len: int, q_chunk: int, k_chunk: int) -> tuple[int, int]:
  """Query and key blocks: the chunks, at most MAX_BLOCK, at least MIN_BLOCK,
  powers of two, and no longer than the (padded) lengths need."""
  def size(chunk, length):
    b = 1 << (max(MIN_BLOCK, min(chunk, MAX_BLOCK)).bit_length() - 1)
    return min(b, max(MIN_BLOCK, 1 << (max(1, length) - 1).bit_length()))
  return size(q_chunk, q_len), size(k_chunk, k_len)


def _ranges(x_BxN, block: int):
  """(min, max) of each block of `block` entries: [B, N / block] each."""
  x = x_BxN.reshape(x_BxN.shape[0], -1, block)
  return x.min(-1), x.max(-1)


def block_plan(q_end_BxQ, q_lo_BxQ, k_end_BxS, q_seg_BxQ, k_seg_BxS, block_q: int,
               block_k: int, count_bound: int):
  """Which key blocks each query block reads, and which query blocks read each
  key block: (kidx [B, nq, nk_max], kcount [B, nq], qidx [B, nk, nq_max],
  qcount [B, nk]); the first `count` entries of each row are the blocks, in
  order. A pair is read where some key may end at or before some query and
  after its lower bound (block end ranges), and their document ranges
  overlap. Lengths are padded to whole blocks; `count_bound` (static) bounds
  the key blocks of any query block."""
  _, qe_max = _ranges(q_end_BxQ, block_q)
  lo_min, _ = _ranges(q_lo_BxQ, block_q)
  ke_min, ke_max = _ranges(k_end_BxS, block_k)
  qs_min, qs_max = _ranges(q_seg_BxQ, block_q)
  ks_min, ks_max = _ranges(k_seg_BxS, block_k)
  needed_BxNxM = ((ke_min[:, None, :] <= qe_max[:, :, None])
                  & (ke_max[:, None, :] > lo_min[:, :, None])
                  & (ks_min[:, None, :] <= qs_max[:, :, None])
                  & (ks_max[:, None, :] >= qs_min[:, :, None]))

  def listed(needed, bound):
    # Needed blocks first, in index order (a stable sort of "not needed").
    order = jnp.argsort(~needed, axis=-1, stable=True).astype(jnp.int32)
    return order[..., :bound], needed.sum(-1).astype(jnp.int32)

  nq, nk = needed_BxNxM.shape[1:]
  kidx, kcount = listed(needed_BxNxM, min(count_bound, nk))
  qidx, qcount = listed(needed_BxNxM.transpose(0, 2, 1), nq)
  return kidx, kcount, qidx, qcount


def static_needed(q_end, q_lo, k_end, block_q: int, block_k: int) -> np.ndarray:
  """bool [nq, nk]: the block pairs the end rule (and lower bounds) allows,
  from static ends (numpy [Q], [Q] or None, [S]), padded like `attend` pads;
  documents aside (data shorten the lists at run time)."""
  def padded(x, block, value):
    out = np.full(-(-len(x) // block) * block, value)
    out[:len(x)] = x
    return out.reshape(-1, block)
  q_lo = np.full(len(q_end), _NO_LO) if q_lo is None else q_lo
  qe, lo = padded(q_end, block_q, _Q_PAD_END), padded(q_lo, block_q, _NO_LO)
  ke = padded(k_end, block_k, _K_PAD_END)
  return ((ke.min(1)[None, :] <= qe.max(1)[:, None])
          & (ke.max(1)[None, :] > lo.min(1)[:, None]))


def static_bound(q_end, q_lo, k_end, block_q: int, block_k: int) -> int:
  """The most key blocks any query block reads (`static_needed`)."""
  return max(1, int(static_needed(q_end, q_lo, k_end, block_q, block_k).sum(1).max()))


def _allowed(qe_Q, lo_Q, qs_Q, ke_S, ks_S):
  return ((ke_S[None, :] <= qe_Q[:, None]) & (ke_S[None, :] > lo_Q[:, None])
          & (ks_S[None, :] == qs_Q[:, None]))


def _scores(q_QxK, k_SxK, scale: float):
  s = jax.lax.dot_general(q_QxK, k_SxK, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
  return s * scale


def _rows(ref, start, size: int):
  """`size` rows of a block ref from `start` (a multiple of `size`)."""
  return ref[pl.ds(pl.multiple_of(start, size), size)]


def _forward_kernel(kidx_ref, kcount_ref, qe_ref, lo_ref, qs_ref, ke_ref, ks_ref, q_ref, k_ref,
                    v_ref, o_ref, lse_ref, *, block_k: int, scale: float):
  """One query block of one row and head: online softmax over its key blocks."""
  q, qe, lo, qs = q_ref[...], qe_ref[...], lo_ref[...], qs_ref[...]
  block_q, dim = q.shape

  def step(n, carry):
    m, l, acc = carry
    start = kidx_ref[n] * block_k
    k, v = _rows(k_ref, start, block_k), _rows(v_ref, start, block_k)
    ok = _allowed(qe, lo, qs, _rows(ke_ref, start, block_k), _rows(ks_ref, start, block_k))
    s = jnp.where(ok, _scores(q, k, scale), -jnp.inf)
    m_new = jnp.maximum(m, s.max(1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: exp() stays 0
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=_F32)
    return m_new, alpha * l + p.sum(1), alpha[:, None] * acc + pv

  init = (jnp.full((block_q,), -jnp.inf, _F32), jnp.zeros((block_q,), _F32),
          jnp.zeros((block_q, dim), _F32))
  m, l, acc = jax.lax.fori_loop(0, kcount_ref[0], step, init)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(kidx_ref, kcount_ref, qe_ref, lo_ref, qs_ref, ke_ref, ks_ref, q_ref, k_ref,
               v_ref, do_ref, lse_ref, d_ref, dq_ref, *, block_k: int, scale: float):
  """dq of one query block over its key blocks."""
  q, do, qe, lo, qs = q_ref[...], do_ref[...], qe_ref[...], lo_ref[...], qs_ref[...]
  lse, d = lse_ref[...], d_ref[...]

  def step(n, dq):
    start = kidx_ref[n] * block_k
    k, v = _rows(k_ref, start, block_k), _rows(v_ref, start, block_k)
    ok = _allowed(qe, lo, qs, _rows(ke_ref, start, block_k), _rows(ks_ref, start, block_k))
    p = jnp.where(ok, jnp.exp(_scores(q, k, scale) - lse[:, None]), 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    ds = (p * (dp - d[:, None])).astype(k.dtype)
    return dq + jax.lax.dot_general(ds, k, (((1,), (0,)), ((), ())), preferred_element_type=_F32)

  dq = jax.lax.fori_loop(0, kcount_ref[0], step, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qidx_ref, qcount_ref, qe_ref, lo_ref, qs_ref, ke_ref, ks_ref, q_ref, k_ref,
                v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, *, block_q: int, scale: float):
  """dk and dv of one key block over the query blocks that read it."""
  k, v, ke, ks = k_ref[...], v_ref[...], ke_ref[...], ks_ref[...]

  def step(n, carry):
    dk, dv = carry
    start = qidx_ref[n] * block_q
    q, do = _rows(q_ref, start, block_q), _rows(do_ref, start, block_q)
    lse, d = _rows(lse_ref, start, block_q), _rows(d_ref, start, block_q)
    ok = _allowed(_rows(qe_ref, start, block_q), _rows(lo_ref, start, block_q),
                  _rows(qs_ref, start, block_q), ke, ks)
    p = jnp.where(ok, jnp.exp(_scores(q, k, scale) - lse[:, None]), 0.0)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                  preferred_element_type=_F32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    ds = (p * (dp - d[:, None])).astype(q.dtype)
    dk = dk + jax.lax.dot_general(ds, q, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    return dk, dv

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = jax.lax.fori_loop(0, qcount_ref[0], step, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret: bool, launch_ws, **static):
  from jax.experimental.pallas import triton as plgpu  # only where the kernel is built
  warps, stages = launch_ws
  return pl.pallas_call(functools.partial(kernel, **static), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        compiler_params=plgpu.CompilerParams(num_warps=warps,
                                                             num_stages=stages))


def _specs(bq: int, bk: int, q_len: int, k_len: int, dim: int, by_key: bool):
  """BlockSpecs over grid (B, H, blocks): the gridded side ([B, n, H, K]
  tensors, [B, n] ends and documents, [B, H, n] statistics) by block, the
  other side whole (the kernel loads the blocks its list names)."""
  def tensor(rows, whole):
    return pl.BlockSpec((None, rows, None, dim),
                        (lambda b, h, i: (b, 0, h, 0)) if whole else (lambda b, h, i: (b, i, h, 0)))

  def per_row(rows, whole):
    return pl.BlockSpec((None, rows),
                        (lambda b, h, i: (b, 0)) if whole else (lambda b, h, i: (b, i)))

  def stat(rows, whole):
    return pl.BlockSpec((None, None, rows),
                        (lambda b, h, i: (b, h, 0)) if whole else (lambda b, h, i: (b, h, i)))

  q_whole, k_whole = by_key, not by_key
  q_rows, k_rows = (q_len if q_whole else bq), (k_len if k_whole else bk)
  return dict(tensor_q=tensor(q_rows, q_whole), tensor_k=tensor(k_rows, k_whole),
              row_q=per_row(q_rows, q_whole), row_k=per_row(k_rows, k_whole),
              stat_q=stat(q_rows, q_whole))


def _plan_specs(bound: int):
  return [pl.BlockSpec((None, None, bound), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))]


def _in_specs(sp, bound: int, backward: bool):
  """The block lists, the five per-row arrays (query end, lower bound and
  document; key end and document), q, k, v, and for the backward pass do and
  the two per-query statistics."""
  specs = (_plan_specs(bound) + [sp["row_q"]] * 3 + [sp["row_k"]] * 2
           + [sp["tensor_q"], sp["tensor_k"], sp["tensor_k"]])
  return specs + ([sp["tensor_q"], sp["stat_q"], sp["stat_q"]] if backward else [])


def _forward(plan, ends, q, k, v, block_q, block_k, interpret, launch_ws):
  kidx, kcount = plan[:2]
  b, q_len, h, dim = q.shape
  sp = _specs(block_q, block_k, q_len, k.shape[1], dim, by_key=False)
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, q_len), _F32))
  return _call(_forward_kernel, (b, h, q_len // block_q), _in_specs(sp, kidx.shape[-1], False),
               (sp["tensor_q"], sp["stat_q"]), out_shape, interpret, launch_ws, block_k=block_k,
               scale=dim ** -0.5)(kidx, kcount[..., None], *ends, q, k, v)


def _backward(plan, ends, q, k, v, do, lse_BxHxQ, d_BxHxQ, block_q, block_k, interpret,
              launch_ws):
  kidx, kcount, qidx, qcount = plan
  b, q_len, h, dim = q.shape
  k_len = k.shape[1]
  scale = dim ** -0.5
  tensors = (q, k, v, do, lse_BxHxQ, d_BxHxQ)
  sp = _specs(block_q, block_k, q_len, k_len, dim, by_key=False)
  dq = _call(_dq_kernel, (b, h, q_len // block_q), _in_specs(sp, kidx.shape[-1], True),
             sp["tensor_q"], jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, launch_ws,
             block_k=block_k, scale=scale)(kidx, kcount[..., None], *ends, *tensors)
  sk = _specs(block_q, block_k, q_len, k_len, dim, by_key=True)
  dk, dv = _call(_dkv_kernel, (b, h, k_len // block_k), _in_specs(sk, qidx.shape[-1], True),
                 (sk["tensor_k"], sk["tensor_k"]),
                 (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                 interpret, launch_ws, block_q=block_q, scale=scale)(
                     qidx, qcount[..., None], *ends, *tensors)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attend_padded(plan, ends, q, k, v, block_q, block_k, interpret, launch_ws):
  return _forward(plan, ends, q, k, v, block_q, block_k, interpret, launch_ws)


def _attend_fwd(plan, ends, q, k, v, block_q, block_k, interpret, launch_ws):
  o, lse = _forward(plan, ends, q, k, v, block_q, block_k, interpret, launch_ws)
  return (o, lse), (plan, ends, q, k, v, o, lse)


def _attend_bwd(block_q, block_k, interpret, launch_ws, res, cotangents):
  plan, ends, q, k, v, o, lse = res
  do, dlse = cotangents
  # d lse / d s is the softmax, so an lse cotangent enters with the row's D.
  d = (do.astype(_F32) * o.astype(_F32)).sum(-1).transpose(0, 2, 1) - dlse.astype(_F32)
  # A query with no allowed key: every probability 0 (exp(s - inf)), and its
  # D must be finite too, since the kernels form p * (dp - D) and a merge of
  # two empty key sets hands such a row a NaN lse cotangent.
  none = lse == -jnp.inf
  lse_safe, d = jnp.where(none, jnp.inf, lse), jnp.where(none, 0.0, d)
  dq, dk, dv = _backward(plan, ends, q, k, v, do.astype(q.dtype), lse_safe, d, block_q, block_k,
                         interpret, launch_ws)
  # Integer inputs (the block lists, ends and documents) have no cotangent.
  return None, None, dq, dk, dv


_attend_padded.defvjp(_attend_fwd, _attend_bwd)


def pad_length(x, n: int, value=0):
  """`x` [B, L, ...] padded with `value` to length `n` along axis 1."""
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                 constant_values=value)


def attend(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_end, k_end, q_seg_BxQ, k_seg_BxS,
           q_chunk: int = 64, k_chunk: int = 64, interpret: bool = False, q_lo=None,
           launch_ws: tuple[int, int] | None = None):
  """(output [B, Q, H, K], log-sum-exp [B, Q, H] float32) of end-rule attention.

  `q_end` [Q] and `k_end` [S] are static (numpy) or per row ([B, Q], [B, S]
  arrays); `q_lo` (like `q_end`; default none) also requires key.end > q_lo.
  Blocks are `block_sizes` of the chunks; `launch_ws` is (num_warps,
  num_stages), default `launch`'s for the shape. `interpret` runs Pallas's
  interpreter (CPU)."""
  b, q_len, h, dim = q_BxQxHxK.shape
  k_len = k_BxSxHxK.shape[1]
  block_q, block_k = block_sizes(q_len, k_len, q_chunk, k_chunk)
  launch_ws = launch_ws or launch(block_q, block_k, dim, q_BxQxHxK.dtype)
  q_pad, k_pad = -(-q_len // block_q) * block_q, -(-k_len // block_k) * block_k
  if q_lo is None:
    q_lo = np.full(q_len, _NO_LO) if isinstance(q_end, np.ndarray) else jnp.full_like(q_end, _NO_LO)
  static = all(isinstance(x, np.ndarray) for x in (q_end, q_lo, k_end))
  bound = (static_bound(q_end, q_lo, k_end, block_q, block_k) if static
           else k_pad // block_k)

  def per_row(x, length, pad_to, pad_value):
    x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, length))
    return pad_length(x, pad_to, pad_value)

  qe, lo = per_row(q_end, q_len, q_pad, _Q_PAD_END), per_row(q_lo, q_len, q_pad, _NO_LO)
  ke = per_row(k_end, k_len, k_pad, _K_PAD_END)
  qs = pad_length(q_seg_BxQ.astype(jnp.int32), q_pad, -1)
  ks = pad_length(k_seg_BxS.astype(jnp.int32), k_pad, -2)
  plan = block_plan(qe, lo, ke, qs, ks, block_q, block_k, bound)
  q = pad_length(q_BxQxHxK, q_pad)
  k, v = pad_length(k_BxSxHxK, k_pad), pad_length(v_BxSxHxK, k_pad)
  o, lse_BxHxQ = _attend_padded(plan, (qe, lo, qs, ke, ks), q, k, v, block_q, block_k,
                                interpret, tuple(launch_ws))
  return o[:, :q_len], lse_BxHxQ.transpose(0, 2, 1)[:, :q_len]
