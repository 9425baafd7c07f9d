"""Blockwise attention against the dense reference: the function alone, every
model, and mixed precision training (docs/design.md section 4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiertx import attention, flash, models, profiling, train
from hiertx.errors import ConfigError
import tiny_models
from tiny_models import MODELS, V, model_cfg


def _inputs(q_len, k_end, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s_len = len(k_end)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), dtype) for n in (q_len, s_len, s_len))
  return q, k, v


def _loss(fn, q, k, v, w_o, w_l):
  o, lse = fn(q, k, v)
  # Rows with no allowed key have lse = -inf; weight only the finite ones.
  return (o * w_o).sum() + jnp.where(jnp.isfinite(lse), lse * w_l, 0.0).sum()


# How chunk pairs are batched: as the backend's defaults give (all pairs in
# one batch here), one pair per batch (every query chunk split over batches),
# and the per-call cap on batches (several pairs per batch, some chunks split).
BATCHINGS = {"default": {}, "pair by pair": {"BATCH_SCORES": {"cpu": 1}, "MAX_BATCHES": 10**6},
             "capped": {"BATCH_SCORES": {"cpu": 1}, "MAX_BATCHES": 3}}


@pytest.mark.parametrize("batching", sorted(BATCHINGS))
@pytest.mark.parametrize("q_chunk,k_chunk", [(8, 16), (4, 4), (64, 64)])
def test_blockwise_equals_dense_with_its_gradients(q_chunk, k_chunk, batching, monkeypatch):
  """Fine queries over fine and coarse keys (not monotone), two documents, a
  query with no allowed key; chunkings that do and do not divide the lengths,
  as many chunk pairs and as one pair, batched in every way."""
  for name, value in BATCHINGS[batching].items():
    monkeypatch.setattr(attention, name, value)
  q_end = np.arange(37)
  k_end = np.concatenate([np.arange(37), np.arange(10) * 4])
  q_seg = jnp.asarray([[1] * 10 + [2] * 27, [1] * 37])
  k_seg = jnp.concatenate([q_seg, q_seg[:, ::4]], 1)
  q_seg = q_seg.at[0, 3].set(7)  # a query whose document has no keys at all
  q, k, v = _inputs(37, k_end)
  dense = lambda q, k, v: attention.dense(
      q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, k_seg))
  block = lambda q, k, v: attention.blockwise(
      q, k, v, q_end, k_end, q_seg, k_seg, q_chunk, k_chunk)
  plan = attention.plan(q_end, k_end, q_chunk, k_chunk)
  assert (plan.pairs == 1) == (q_chunk == 64)
  (od, ld), (ob, lb) = dense(q, k, v), jax.jit(block)(q, k, v)
  np.testing.assert_allclose(ob, od, atol=1e-6)
  np.testing.assert_array_equal(np.isfinite(lb), np.isfinite(ld))
  assert not np.isfinite(ld[0, 3]).any() and float(jnp.abs(ob[0, 3]).max()) == 0.0
  np.testing.assert_allclose(jnp.where(jnp.isfinite(lb), lb, 0), jnp.where(jnp.isfinite(ld), ld, 0),
                             atol=1e-6)
  rng = np.random.default_rng(1)
  w_o, w_l = jnp.asarray(rng.normal(size=od.shape)), jnp.asarray(rng.normal(size=ld.shape))
  gd = jax.grad(functools.partial(_loss, dense), argnums=(0, 1, 2))(q, k, v, w_o, w_l)
  gb = jax.jit(jax.grad(functools.partial(_loss, block), argnums=(0, 1, 2)))(q, k, v, w_o, w_l)
  for a, b in zip(gd, gb):
    np.testing.assert_allclose(b, a, atol=1e-5)


def _pallas_case(case):
  """(q_end, k_end, q_seg, k_seg, chunks, q_lo) of the kernel's test cases: the
  blockwise test's ends (fine queries over fine and coarse keys, two
  documents, a query with no allowed key), per-row ends, and a window."""
  q_end = np.arange(37)
  k_end = np.concatenate([np.arange(37), np.arange(10) * 4])
  q_seg = jnp.asarray([[1] * 10 + [2] * 27, [1] * 37])
  k_seg = jnp.concatenate([q_seg, q_seg[:, ::4]], 1)
  q_seg = q_seg.at[0, 3].set(7)
  rng = np.random.default_rng(4)
  if case == "per-row ends":  # content groups: each row its own (unsorted) key ends
    k_end = jnp.asarray(np.stack([rng.permutation(47) % 40, rng.permutation(47) * 2]))
    q_end = jnp.asarray(np.stack([q_end, q_end * 2]))
  lo = q_end - 9 if case == "window" else None  # keys ending in (t - 9, t]
  chunks = (64, 64) if case == "one block" else (16, 16)
  return q_end, k_end, q_seg, k_seg, chunks, lo


@pytest.mark.parametrize("case", ["blocks", "one block", "per-row ends", "window"])
def test_pallas_kernel_equals_dense_with_its_gradients(case):
  """The end-rule flash kernel (in Pallas's interpreter): outputs, lse and the
  gradients of both, against `dense` under the same rule."""
  q_end, k_end, q_seg, k_seg, (cq, ck), lo = _pallas_case(case)
  q, k, v = _inputs(37, np.zeros(47))
  mask = attention.end_rule_mask(q_end, k_end, q_seg, k_seg)
  if lo is not None:
    mask &= (k_end[None, None, :] > lo[None, :, None])
  dense = lambda q, k, v: attention.dense(q, k, v, mask)
  kernel = lambda q, k, v: flash.attend(
      q, k, v, q_end, k_end, q_seg, k_seg, cq, ck, interpret=True, q_lo=lo)
  rng = np.random.default_rng(1)
  w_o, w_l = jnp.asarray(rng.normal(size=q.shape)), jnp.asarray(rng.normal(size=q.shape[:3]))
  (_, (od, ld)), gd = jax.value_and_grad(
      lambda *a: _loss_aux(dense, *a, w_o, w_l), (0, 1, 2), has_aux=True)(q, k, v)
  (_, (ok, lk)), gk = jax.jit(jax.value_and_grad(
      lambda *a: _loss_aux(kernel, *a, w_o, w_l), (0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(ok, od, atol=1e-5)
  np.testing.assert_array_equal(np.isfinite(lk), np.isfinite(ld))
  assert (~np.isfinite(ld)).any()  # a query with no allowed key: output 0, lse -inf
  np.testing.assert_allclose(jnp.where(jnp.isfinite(lk), lk, 0), jnp.where(jnp.isfinite(ld), ld, 0),
                             atol=1e-5)
  for a, b in zip(gd, gk):
    np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize("kernel", ["pallas", "blockwise"])
def test_merged_parts_with_no_allowed_key_have_finite_gradients(kernel):
  """A query with no allowed key in either of two merged key sets (both lse
  -inf, so the merge hands each part a NaN lse cotangent): the kernels'
  backward passes give `dense`'s gradients over the union, no NaN."""
  q_end, k_end, q_seg, k_seg, _, _ = _pallas_case("blocks")
  q, k, v = _inputs(37, k_end)
  fine, coarse = slice(0, 37), slice(37, 47)

  def part(q, k, v, keys):
    if kernel == "pallas":
      return flash.attend(q, k[:, keys], v[:, keys], q_end, k_end[keys], q_seg, k_seg[:, keys],
                          16, 16, interpret=True)
    return attention.blockwise(q, k[:, keys], v[:, keys], q_end, k_end[keys], q_seg,
                               k_seg[:, keys], 16, 16)

  merged = lambda q, k, v: attention.merge(part(q, k, v, fine), part(q, k, v, coarse))
  dense = lambda q, k, v: attention.dense(
      q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, k_seg))
  rng = np.random.default_rng(2)
  w_o, w_l = jnp.asarray(rng.normal(size=q.shape)), jnp.asarray(rng.normal(size=q.shape[:3]))
  assert not np.isfinite(merged(q, k, v)[1][0, 3]).any()  # the query with no key anywhere
  gd = jax.grad(functools.partial(_loss, dense), argnums=(0, 1, 2))(q, k, v, w_o, w_l)
  gm = jax.jit(jax.grad(functools.partial(_loss, merged), argnums=(0, 1, 2)))(q, k, v, w_o, w_l)
  for a, b in zip(gd, gm):
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b, a, atol=1e-4)


def _loss_aux(fn, q, k, v, w_o, w_l):
  o, lse = fn(q, k, v)
  return (o * w_o).sum() + jnp.where(jnp.isfinite(lse), lse * w_l, 0.0).sum(), (o, lse)


def test_pallas_kernel_reads_only_allowed_blocks_lowers_to_triton_and_runs_per_device():
  """Block lists: causal query blocks read 1, 2, 3, 4 key blocks, a second
  document drops the first's blocks, a window keeps only its own. The
  kernel lowers for GPUs (three Triton kernels: forward, dq, dk and dv, for
  bfloat16 at head width 64), and under the 8-device mesh runs per device
  with the result of one device."""
  t = np.arange(64)
  seg = jnp.asarray([[1] * 64, [1] * 20 + [2] * 44], jnp.int32)
  no_lo = jnp.full((2, 64), -(1 << 30))
  kidx, kcount, qidx, qcount = flash.block_plan(
      jnp.broadcast_to(t, (2, 64)), no_lo, jnp.broadcast_to(t, (2, 64)), seg, seg, 16, 16, 4)
  assert kcount.tolist() == [[1, 2, 3, 4], [1, 2, 2, 3]]
  assert kidx[1, 3, :3].tolist() == [1, 2, 3] and qcount[0].tolist() == [4, 3, 2, 1]
  assert flash.static_bound(t, t - 16, t, 16, 16) == 2  # window of 16: 2 blocks at most
  assert flash.static_bound(t, None, t, 16, 16) == 4
  assert attention.score_count(t, t, attention.AttentionConfig("pallas", 16, 16)) == 10 * 16 * 16

  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  kc = jax.ShapeDtypeStruct((2, 64, 4, 64), jnp.bfloat16)
  seg_f, seg_c = jnp.ones((2, 256), jnp.int32), jnp.ones((2, 64), jnp.int32)

  def loss(q, k, v):
    o, lse = flash.attend(q, k, v, np.arange(256), np.arange(64) * 4 + 3, seg_f, seg_c)
    return o.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()

  # Lowering for a GPU this machine lacks: an abstract H200 says which (jax
  # 0.11 asks; 0.10 assumes compute capability 9.0 when it finds none).
  h200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", num_cores=None, platform="gpu"))
  with jax.sharding.use_abstract_mesh(h200):
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kc, kc).lower(
        lowering_platforms=("cuda",)).as_text()
  assert lowered.count("xla.gpu.triton") == 3
  assert flash.gpu_refusal(64) == "" and "power of two" in flash.gpu_refusal(8)

  q_end, k_end, q_seg, k_seg, _, _ = _pallas_case("blocks")
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(8, n, 4, 16)), jnp.float32) for n in (37, 47, 47))
  q_seg, k_seg = jnp.tile(q_seg, (4, 1)), jnp.tile(k_seg, (4, 1))
  cfg = attention.AttentionConfig("pallas", 16, 16)
  run = lambda q, k, v: attention.pallas_attend(
      q, k, v, q_end, k_end, q_seg, k_seg, cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with jax.sharding.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v))
    got = jax.jit(run)(q, k, v)
  want = attention.dense(q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, k_seg))
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_pairs_are_batched_by_whole_query_chunks_where_they_fit():
  causal = attention.plan(np.arange(64), np.arange(64), 16, 16)  # chunks read 1, 2, 3, 4 pairs
  got = [(list(qi), list(kj)) for qi, kj in attention.pair_batches(causal, 3)]
  assert got == [([0, 1, 1], [0, 0, 1]), ([2, 2, 2], [0, 1, 2]), ([3, 3, 3], [0, 1, 2]),
                 ([3], [3])]
  assert len(attention.pair_batches(causal, 100)) == 1
  # Every pair exactly once, in every batching.
  for size in (1, 2, 5, 10):
    pairs = [(i, j) for qi, kj in attention.pair_batches(causal, size) for i, j in zip(qi, kj)]
    assert sorted(pairs) == [(i, j) for i in range(4) for j in range(i + 1)]
  # The score budget sets the batch size; the cap on batches per call wins.
  assert attention.pairs_per_batch(36, 1, 8, 256 * 256, "cpu") == 8
  assert attention.pairs_per_batch(528, 1, 8, 256 * 256, "cpu") == 17
  assert attention.pairs_per_batch(36, 16, 8, 256 * 256, "gpu") == 16


def test_the_compiled_train_step_has_no_loops_over_chunk_pairs():
  """Several chunk pairs per attention call (sequence 64, chunks of 8), fine
  and coarse: the compiled step holds no while loop."""
  from conftest import PRODUCTION_EMITTERS, config_path
  from hiertx import config as config_lib
  from hiertx import steps
  for name, arg in (("vanilla", "size=tiny"), ("hourglass", "size=tiny")):
    config = config_lib.load(config_path(name) + ":" + arg)
    config.model.attention_q_chunk = config.model.attention_k_chunk = 8
    run = steps.build_run(config, devices=jax.devices()[:1])
    text = run.train_step.lower(run.abstract_state, steps.batch_spec(config, run)).compile(
        PRODUCTION_EMITTERS).as_text()
    assert config.data.seq_len >= 64 and " while(" not in text, name


def test_the_plan_skips_what_the_rule_forbids():
  """Causal self-attention computes about half the chunk pairs; fine queries
  over a coarse scale skip every coarse chunk that ends after a query chunk."""
  causal = attention.plan(np.arange(1024), np.arange(1024), 128, 128)
  assert causal.pairs == 8 * 9 // 2 and causal.scores == 36 * 128 * 128
  coarse = attention.plan(np.arange(1024), np.arange(64) * 16, 128, 16)
  assert coarse.pairs == sum(min(4, -(-(128 * (i + 1)) // 256)) for i in range(8))
  assert attention.score_count(np.arange(8), np.arange(8), attention.AttentionConfig("dense")) == 64


def test_merging_disjoint_key_sets_is_attention_over_their_union():
  k_end = np.arange(20)
  q_end, q_seg = np.arange(20), jnp.ones((2, 20), jnp.int32)
  q, k, v = _inputs(20, k_end)
  whole = attention.dense(q, k, v, attention.end_rule_mask(q_end, k_end, q_seg, q_seg))
  first = attention.dense(q, k[:, :7], v[:, :7],
                          attention.end_rule_mask(q_end, k_end[:7], q_seg, q_seg[:, :7]))
  rest = attention.dense(q, k[:, 7:], v[:, 7:],
                         attention.end_rule_mask(q_end, k_end[7:], q_seg, q_seg[:, 7:]))
  merged = attention.merge(first, rest)
  np.testing.assert_allclose(merged[0], whole[0], atol=1e-6)
  np.testing.assert_allclose(merged[1], whole[1], atol=1e-6)


def test_fused_causal_kernel_plumbing_matches_the_rule():
  """The call cuDNN gets on GPU (run here through its XLA implementation)
  computes the end rule for fine causal self-attention with documents; the
  dispatcher sends nothing else there."""
  seg = jnp.asarray([[1] * 9 + [2] * 23, [1] * 32])
  q, k, v = _inputs(32, np.arange(32))
  want = attention.dense(q, k, v, attention.end_rule_mask(np.arange(32), np.arange(32), seg,
                                                          seg))[0]
  got = attention.fused_causal(q, k, v, seg, seg, implementation=None)
  np.testing.assert_allclose(got, want, atol=1e-5)
  fine = np.arange(32)
  refusal = lambda q, k, dtype=jnp.bfloat16, backend="gpu": attention.cudnn_refusal(
      q, k, dtype, 64, backend=backend)
  assert refusal(fine, fine) == ""
  # Any scale's own strictly increasing ends: causal in index order.
  assert refusal(fine[::4] + 3, fine[::4] + 3) == ""
  assert "GPU" in refusal(fine, fine, backend="cpu")
  assert "float32" in refusal(fine, fine, jnp.float32)
  assert "own scale" in refusal(fine, fine[::2])
  assert "own scale" in refusal(fine[::-1], fine[::-1])
  coarse, cseg = fine[::4] + 3, seg[:, ::4]
  want = attention.dense(q[:, :8], k[:, :8], v[:, :8],
                         attention.end_rule_mask(coarse, coarse, cseg, cseg))[0]
  got = attention.fused_causal(q[:, :8], k[:, :8], v[:, :8], cseg, cseg, implementation=None)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_cudnn_routes_documents_without_a_mask_tensor_where_it_can(monkeypatch):
  """Same-scale sites under `cudnn` (through its XLA implementation here):
  documents that see each other take causal attention with no mask; with
  documents masked, rows holding one document do too, and packed rows go to
  the Pallas kernel's segment ids (its interpreter here) or, if asked,
  cuDNN's masked form; each route equals `dense` under its rule on packed
  and unpacked rows, and the site line says which route runs."""
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  t = 32
  fine = np.arange(t)
  q, k, v = _inputs(t, fine, dtype=jnp.bfloat16)
  packed = jnp.asarray([[1] * 9 + [2] * 20 + [0] * 3, [1] * 30 + [0] * 2])
  single = jnp.asarray([[1] * 29 + [0] * 3, [5] * 32])
  visible = (packed != 0).astype(jnp.int32)
  assert not attention.one_document_rows(packed) and attention.one_document_rows(single)
  assert attention.one_document_rows(visible)
  assert not attention.one_document_rows(jnp.asarray([[1, 0, 1, 1]]))  # padding inside a row

  def ref(seg):
    o = attention.dense(q, k, v, attention.end_rule_mask(fine, fine, seg, seg))[0]
    return np.asarray(jnp.where((seg != 0)[..., None, None], o, 0), np.float32)

  def run(cfg, seg):
    with attention.record_sites() as sites:
      fn = lambda q, k, v, s: attention.attend(q, k, v, fine, fine, s, s, cfg, site="x/attn")
      out = jax.jit(fn)(q, k, v, seg)
      jaxpr = str(jax.make_jaxpr(fn)(q, k, v, seg))
    live = (seg != 0)[..., None, None]
    return np.asarray(jnp.where(live, out, 0), np.float32), sites[0].text(), jaxpr

  cases = [("visible", "pallas", visible, "no mask: documents see each other"),
           ("masked", "pallas", packed, "packed rows -> pallas (segment ids)"),
           ("masked", "pallas", single, "packed rows -> pallas (segment ids)"),
           ("masked", "mask", packed, f"cuDNN with a [B, 1, {t}, {t}] document bias"),
           ("masked", "mask", single, "document bias")]
  for documents, packed_route, seg, note in cases:
    cfg = attention.AttentionConfig("cudnn", documents=documents, cudnn_packed=packed_route)
    got, line, jaxpr = run(cfg, seg)
    np.testing.assert_allclose(got, ref(seg), atol=2e-2, err_msg=f"{documents} {packed_route}")
    assert line.startswith(f"x/attn: {t} queries x {t} keys -> cudnn (") and note in line, line
    assert ("cond" in jaxpr) == (documents == "masked")
    assert ("pallas_call" in jaxpr) == (documents == "masked" and packed_route == "pallas")
  # Without the Pallas kernel at hand, packed rows take the masked form, said so.
  monkeypatch.setattr(attention, "_pallas_interpret", lambda: False)
  route, note = attention.cudnn_route(t, 8, jnp.bfloat16, attention.AttentionConfig("cudnn"))
  assert route == "mask" and "pallas cannot: head width 8" in note


def test_splash_kernel_matches_the_rule_on_a_mesh(monkeypatch):
  """The Pallas splash kernel TPUs get (run here in its interpreter): outputs
  and gradients of fine causal self-attention with documents equal `dense`,
  alone and under `shard_map` on the 8-device mesh (2 data x 2 fsdp x 2
  tensor); so do those of cross-scale attention (fine queries over coarse
  keys, the rule as a static mask), queries with no allowed key included,
  and that lowers for TPUs; `attend` sends it static ends of whole blocks,
  and only on TPU."""
  t = attention.SPLASH_BLOCK * 2
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(8, t, 4, 16)), jnp.float32) for _ in range(3))
  # Rows with a second document starting at different places, one with none.
  starts = np.asarray([30, 129, 200, 255, 1, 100, 60, t])
  seg = jnp.asarray(np.where(np.arange(t)[None] < starts[:, None], 1, 2).astype(np.int32))
  fine = np.arange(t)
  ref = lambda q, k, v: attention.dense(
      q, k, v, attention.end_rule_mask(fine, fine, seg, seg))[0]
  np.testing.assert_allclose(attention.splash_attend(q, k, v, fine, fine, seg, seg,
                                                    interpret=True), ref(q, k, v), atol=1e-5)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2),
                           ("data", "fsdp", "tensor"))
  monkeypatch.setattr(attention, "_backend", lambda: "tpu")
  cfg = attention.AttentionConfig("splash", 64, 64)
  attend = lambda q, k, v: attention.attend(q, k, v, fine, fine, seg, seg, cfg)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  with jax.sharding.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(attend)(q, k, v))
    got, grads = jax.jit(jax.value_and_grad(lambda *a: (attend(*a) * w).sum(), (0, 1, 2)))(
        q, k, v)
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  want, want_grads = jax.value_and_grad(lambda *a: (ref(*a) * w).sum(), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, wg in zip(grads, want_grads):
    np.testing.assert_allclose(g, wg, atol=5e-5)
  # Fine queries over coarse keys (ends 2g+1): the first query and each
  # second document's first query have no allowed key (output 0).
  coarse, k_seg = fine[1::2], seg[:2, 1::2]
  cross_ref = lambda q, k, v: attention.dense(
      q, k, v, attention.end_rule_mask(fine, coarse, seg[:2], k_seg))[0]
  cross = lambda q, k, v: attention.attend(
      q, k, v, fine, coarse, seg[:2], k_seg, cfg, site="x/attn")
  args = (q[:2], k[:2, ::2], v[:2, ::2])
  got, grads = jax.jit(jax.value_and_grad(lambda *a: (cross(*a) * w[:2]).sum(), (0, 1, 2)))(
      *args)
  want, want_grads = jax.value_and_grad(lambda *a: (cross_ref(*a) * w[:2]).sum(), (0, 1, 2))(
      *args)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, wg in zip(grads, want_grads):
    np.testing.assert_allclose(g, wg, atol=5e-5)
  out = np.asarray(cross(*args))
  assert not np.isnan(out).any() and not out[0, 0].any() and out[0, 1].any()
  # What a TPU compiles: forward, dq and dkv kernels through Mosaic, in bfloat16.
  bf16 = [jax.ShapeDtypeStruct(a.shape[:-1] + (64,), jnp.bfloat16) for a in args]
  tpu = jax.jit(jax.grad(lambda q, k, v: attention.splash_attend(
      q, k, v, fine, coarse, seg[:2], k_seg, interpret=False).astype(jnp.float32).sum(),
      (0, 1, 2))).trace(*bf16).lower(lowering_platforms=("tpu",)).as_text()
  assert tpu.count("tpu_custom_call") == 3
  # A static mask is built once per key (the kernel's block analysis is
  # cached by mask; hashing whole arrays per layer cost seconds at 8k tokens).
  built = []
  make = lambda: attention.StaticMask(("x", 1), lambda: built.append(1) or
                                      np.ones((128, 128), bool))
  assert attention._splash_numpy_mask(make()) is attention._splash_numpy_mask(make())
  assert built == [1]
  # A length off the kernel's block, or a caller merging log-sum-exps: not the
  # kernel; refused unless a fallback is configured.
  assert attention.splash_refusal(fine, fine[::2], backend="tpu") == ""
  assert "TPU" in attention.splash_refusal(fine, fine, backend="gpu")
  assert "key length 64" in attention.splash_refusal(fine, fine[::4], backend="tpu")
  assert "log-sum-exp" in attention.splash_refusal(fine, fine, True, backend="tpu")
  short = lambda cfg: lambda q, k, v: attention.attend(
      q, k[:, ::4], v[:, ::4], fine, fine[::4], seg, seg[:, ::4], cfg, site="x/attn")
  with pytest.raises(ConfigError, match="splash cannot run x/attn .*key length 64 is not a "
                     "multiple of 128"):
    jax.make_jaxpr(short(cfg))(q, k, v)
  fallback = attention.AttentionConfig("splash", 64, 64, fallback="blockwise")
  assert "pallas_call" not in str(jax.make_jaxpr(short(fallback))(q, k, v))


# Whole splash blocks at 256 tokens: retina's 256 fine and 128 pooled keys
# (against its dense implementation), and bottom_up's aggregation over its
# 256 + 128 keys of both scales (against dense attention); one block each.
SPLASH_MODELS = {
    "retina": (dict(windows=(8,), chunk_size=64, num_layers=1), dict(implementation="dense"),
               ["block_0/retina/windows: 256 queries x 384 keys -> splash"]),
    "bottom_up": (dict(layers_per_scale=(1, 1), pool_factors=(2,), post_layers=1),
                  dict(attention="dense"),
                  ["scale_0/block_0/attn: 256 queries x 256 keys -> splash",
                   "scale_1/block_0/attn: 128 queries x 128 keys -> splash",
                   "aggregate/attn: 256 queries x 384 keys -> splash",
                   "post/block_0/attn: 256 queries x 256 keys -> splash"]),
}


@pytest.mark.parametrize("key", sorted(SPLASH_MODELS))
def test_models_on_splash_equal_dense(key, monkeypatch):
  """Under `splash` (TPU; the kernel's interpreter here) every site of these
  models takes the kernel, cross-scale and retina's levels included (one key
  set under the dense implementation's static mask); logits and parameter
  gradients on packed rows equal the dense reference's."""
  monkeypatch.setattr(attention, "_backend", lambda: "tpu")
  t = 256
  shape, reference, want_sites = SPLASH_MODELS[key]
  cfg = lambda **kw: model_cfg(key, max_len=t, **shape, **kw)
  splash, dense = models.build(cfg(attention="splash"), V, t), models.build(cfg(**reference), V, t)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, V)
  seg = jnp.asarray([[1] * 100 + [2] * 156, [1] * t])
  pos = jnp.asarray([list(range(100)) + list(range(156)), list(range(t))])
  params = jax.jit(dense.init)(jax.random.PRNGKey(1), tokens)["params"]

  def loss(model, params):
    logits = model.apply({"params": params}, tokens, seg, pos)
    return (jax.nn.log_softmax(logits) * jax.nn.one_hot(tokens, V)).sum(), logits

  with attention.record_sites() as sites:
    (_, got), grads = jax.jit(jax.value_and_grad(functools.partial(loss, splash),
                                                 has_aux=True))(params)
  (_, want), want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, dense),
                                                     has_aux=True))(params)
  assert attention.sites_text(sites) == want_sites, attention.sites_text(sites)
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5),
                         want_grads, grads)


# Every model and variant whose attention differs: blockwise (small chunks,
# so several pairs and lengths that divide neither the chunks nor the
# pooling) and the Pallas kernel equal dense. Content groups reach attention
# the same way whatever their source (index-ordered coarse self-attention,
# dense cross-scale attention): the entropy variant (attention pooling and
# upsampling) and H-Net's two stages (coarse self-attention at two content
# levels) cover them. retina_dense runs no kernel.
EQUALITY = sorted(k for k in MODELS if not k.endswith(("_whitespace", "_learned", "_dynamic"))
                  and k != "retina_dense")
# The Pallas kernel (its interpreter compiles a loop per site, most of this
# test's time) on the variants that between them hold every kind of site:
# self-attention at full length (vanilla), retina's windows and coarse blocks,
# attention pooling (bottom_up_attn_pool) and upsampling (top_down_attention)
# over fixed groups, coarse self-attention over fixed groups at several scales
# (hourglass), and over content groups with attention pooling and upsampling
# (hourglass_entropy) and at two content levels (hourglass_dynamic2). The
# others' sites are of these kinds; blockwise runs on all of them.
PALLAS_EQUALITY = ("vanilla", "retina", "bottom_up_attn_pool", "top_down_attention", "hourglass",
                   "hourglass_entropy", "hourglass_dynamic2")


@pytest.mark.parametrize("key", EQUALITY)
def test_every_model_blockwise_and_pallas_equal_dense_logits_and_gradients(key, monkeypatch):
  """Blockwise, and (PALLAS_EQUALITY) every site on the Pallas kernel (its
  interpreter, as on a GPU), against dense."""
  t = 29  # divides no tiny model's pooling nor the chunks below
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, V)
  seg = jnp.asarray([[1] * 11 + [2] * 18, [1] * 3 + [2] * 26])
  pos = jnp.asarray([list(range(11)) + list(range(18)), list(range(3)) + list(range(26))])
  dense = models.build(model_cfg(key, attention="dense"), V, 64)
  block = models.build(model_cfg(key, attention="blockwise", attention_q_chunk=4,
                                 attention_k_chunk=8), V, 64)
  params = tiny_models.params(key)

  def loss(model, params):
    logits = model.apply({"params": params}, tokens, seg, pos)
    return (jax.nn.log_softmax(logits) * jax.nn.one_hot(tokens, V)).sum(), logits

  (_, ld), gd = jax.jit(jax.value_and_grad(functools.partial(loss, dense), has_aux=True))(params)
  (_, lb), gb = jax.jit(jax.value_and_grad(functools.partial(loss, block), has_aux=True))(params)
  np.testing.assert_allclose(lb, ld, atol=1e-5, rtol=0)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5),
                         gd, gb)
  if key not in PALLAS_EQUALITY:
    return
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  # Blocks of 16 (the kernel's least): two query blocks, several key blocks.
  pallas = models.build(model_cfg(key, attention="pallas", attention_fallback="dense",
                                  attention_q_chunk=16, attention_k_chunk=16), V, 64)
  with attention.record_sites() as sites:
    (_, lp), gp = jax.jit(jax.value_and_grad(functools.partial(loss, pallas), has_aux=True))(
        params)
  assert {s.implementation for s in sites} == {"pallas"}
  np.testing.assert_allclose(lp, ld, atol=1e-5, rtol=0)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5),
                         gd, gp)


def test_profile_steps_write_a_trace_and_a_summary(tiny_config, tmp_path):
  config = tiny_config("vanilla", train__steps=4, train__profile_steps="2,3",
                       eval__every=4, train__checkpoint_every=4)
  train.train_and_evaluate(config, str(tmp_path))
  path = profiling.newest_trace(str(tmp_path))
  ops, total = profiling.top_ops(path, top=5)
  assert len(ops) == 5 and total > 0 and all(ms > 0 for _, ms, _ in ops)
  assert ops == sorted(ops, key=lambda o: -o[1])
  assert list(tmp_path.glob("profile/**/*.xplane.pb"))  # what TensorBoard reads


def _forced_gpu(monkeypatch):
  """`cudnn` sites traced on CPU: the backend reads as GPU; off a GPU device
  the kernel call runs its XLA twin (what the fused-kernel test above
  checks), and packed rows the Pallas kernel's interpreter."""
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")


def test_sites_get_the_kernel_at_every_scale_and_nothing_falls_back_silently(monkeypatch):
  """Hourglass with attention pooling and upsampling under `cudnn`: the
  self-attention of both scales takes the kernel (and computes what blockwise
  does), the cross-scale sites are refused by name, or run the configured
  fallback; every site is recorded with what it got."""
  _forced_gpu(monkeypatch)
  t = 24
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, t), 1, V)
  seg = jnp.asarray([[1] * 9 + [2] * 15, [1] * 24])
  pos = jnp.asarray([list(range(9)) + list(range(15)), list(range(24))])
  cfg = lambda **kw: model_cfg("hourglass_attention", dtype="bfloat16", **kw)
  blockwise = models.build(cfg(attention="blockwise"), V, 64)
  params = tiny_models.params("hourglass_attention")
  apply = lambda m: m.apply({"params": params}, tokens, seg, pos)
  refused = models.build(cfg(attention="cudnn"), V, 64)
  with pytest.raises(ConfigError, match=r"config.model.attention: cudnn cannot run "
                     r"\S+/attn \(\d+ queries x \d+ keys\): keys are not the queries' own "
                     r"scale; set model.attention_fallback"):
    jax.eval_shape(lambda: apply(refused))
  fused = models.build(cfg(attention="cudnn", attention_fallback="blockwise"), V, 64)
  with attention.record_sites() as sites:
    got = jax.jit(lambda: apply(fused))()
  want = jax.jit(lambda: apply(blockwise))()
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.05, rtol=0.05)
  kinds = {(s.queries, s.keys, s.implementation) for s in sites}
  # 1@1 2@3 1@1: fine (24) and coarse (8) self-attention on the kernel;
  # attention pooling (each group's query over its 3 members) and upsampling
  # (24 queries over 8 coarse keys) fall back, saying why.
  assert kinds == {(24, 24, "cudnn"), (8, 8, "cudnn"), (1, 3, "blockwise"),
                   (24, 8, "blockwise")}, kinds
  assert all(s.why for s in sites if s.implementation == "blockwise")
  route = "no mask for one-document rows; packed rows -> pallas (segment ids)"
  assert all(s.why == route for s in sites if s.implementation == "cudnn")
  lines = attention.sites_text(sites)
  assert len(lines) == 5, lines
  assert f"pre_1/block_{{0..1}}/attn: 8 queries x 8 keys -> cudnn ({route}) [x2]" in lines, lines


def test_every_gpu_kernel_limit_is_a_fallback_or_an_error_at_trace_time(monkeypatch):
  """cuDNN's head widths (multiples of 8 up to 128) and even lengths under its
  document mask, and the Pallas kernel's shared memory (tiles x pipeline
  stages x dtype against the GPU's), are checked when a site is traced: the
  site gets its fallback with the reason in its site line, or one
  ConfigError naming it. Launches are chosen by shape; float32 sites say
  they run without tensor cores."""
  monkeypatch.setattr(attention, "_pallas_interpret", lambda: False)  # as on a GPU
  monkeypatch.setattr(attention, "gpu_capability", lambda: "9.0")  # H100 / H200
  fine, bf16, f32 = np.arange(256), jnp.bfloat16, jnp.float32

  def site(cfg, q=fine, k=fine, dtype=bf16, head_dim=64):
    with attention.record_sites() as sites:
      kind = attention.choose("x/attn", q, k, dtype, head_dim, cfg, backend="gpu")
    return kind, sites[0].text()

  cudnn = attention.AttentionConfig("cudnn", fallback="blockwise")
  assert site(cudnn) == ("cudnn", "x/attn: 256 queries x 256 keys -> cudnn (no mask for "
                         "one-document rows; packed rows -> pallas (segment ids))")
  kind, line = site(cudnn, head_dim=60)
  assert kind == "blockwise" and "head width 60 (cuDNN takes multiples of 8 up to 128)" in line
  # An odd length: fine without a mask, refused in cuDNN's masked form.
  assert site(cudnn, fine[:255], fine[:255])[0] == "cudnn"
  kind, line = site(attention.AttentionConfig("cudnn", fallback="blockwise", cudnn_packed="mask"),
                    fine[:255], fine[:255])
  assert kind == "blockwise" and "255 queries (cuDNN's masked form takes even lengths)" in line
  with pytest.raises(ConfigError, match="cudnn cannot run x/attn .*head width 136"):
    site(attention.AttentionConfig("cudnn"), head_dim=136)
  # Pallas at 128 x 128 blocks: bfloat16 at head width 64 pipelines 3 deep
  # with 8 warps; float32 at 128 fits no stage count in 227 KiB.
  pallas = attention.AttentionConfig("pallas", 128, 128, fallback="blockwise")
  assert attention.pallas_launch(256, 256, 64, bf16, pallas)[1] == (8, 3)
  assert attention.pallas_launch(256, 256, 64, f32, pallas)[1] == (8, 1)
  assert attention.pallas_launch(256, 256, 64, bf16, pallas, capability="8.6")[1] == (8, 1)
  assert attention.pallas_launch(64, 64, 32, bf16, attention.AttentionConfig(
      "pallas", 64, 64))[1] == (4, 3)
  assert attention.pallas_launch(256, 256, 64, bf16, attention.AttentionConfig(
      "pallas", 128, 128, warps=4, stages=2))[1] == (4, 2)  # the config's own
  kind, line = site(pallas)
  assert kind == "pallas" and "no tensor cores" not in line
  kind, line = site(pallas, dtype=f32)
  assert kind == "pallas" and "float32: IEEE matmuls, no tensor cores" in line
  kind, line = site(pallas, dtype=f32, head_dim=128)
  assert kind == "blockwise" and "need 320 KiB of shared memory, this GPU (9.0) has 227" in line
  assert site(attention.AttentionConfig("pallas", 64, 64), dtype=f32, head_dim=128)[0] == "pallas"
  # Stages asked for by the config are held to the same limit.
  assert site(pallas, head_dim=128)[0] == "pallas"  # bfloat16 at 128: 2 stages fit
  kind, line = site(attention.AttentionConfig("pallas", 128, 128, stages=3,
                                              fallback="blockwise"), head_dim=128)
  assert kind == "blockwise" and "with 3 stage(s) need 288 KiB" in line
  with pytest.raises(ConfigError, match="attention_fallback: pallas cannot run x/attn .*shared"):
    site(attention.AttentionConfig("cudnn", 128, 128, fallback="pallas"), fine, fine[::2] + 1,
         f32, 128)
  # What the kernel gets is what the site line was chosen with.
  got = []
  monkeypatch.setattr(attention, "_pallas_interpret", lambda: True)
  monkeypatch.setattr(flash, "attend", lambda *a, **k: got.append(k["launch_ws"]) or (a[0], a[0]))
  q = jnp.zeros((1, 256, 2, 64), bf16)
  seg = jnp.ones((1, 256), jnp.int32)
  attention.pallas_attend(q, q, q, fine, fine, seg, seg, pallas)
  assert got == [(8, 3)]


def test_pallas_takes_what_cudnn_and_splash_cannot_and_is_refused_off_gpus(monkeypatch):
  """cuDNN for the stacks and the Pallas kernel for the rest (retina's windows
  and coarsest level too); a Pallas fallback where it cannot run, or the
  kernel itself off GPUs, is refused by name unless a fallback is configured;
  per-row ends stay on the kernel."""
  fine, coarse, bf16 = np.arange(32), np.arange(8) * 4 + 3, jnp.bfloat16
  mixed = attention.AttentionConfig("cudnn", fallback="pallas")
  choose = lambda cfg, q, k, backend="gpu": attention.choose(
      "x/attn", q, k, bf16, 64, cfg, backend=backend)
  assert choose(mixed, fine, fine) == "cudnn" and choose(mixed, fine, coarse) == "pallas"
  with pytest.raises(ConfigError, match="attention_fallback: pallas cannot run x/attn .* "
                     "either: the Pallas end-rule kernel runs on GPUs, this is tpu"):
    choose(attention.AttentionConfig("splash", fallback="pallas"), fine, coarse, "tpu")
  with pytest.raises(ConfigError, match="pallas cannot run x/attn .*runs on GPUs, this is cpu"):
    choose(attention.AttentionConfig("pallas"), fine, fine, "cpu")
  assert choose(attention.AttentionConfig("pallas", fallback="blockwise"), fine, fine,
                "cpu") == "blockwise"
  per_row = jnp.broadcast_to(jnp.arange(32), (2, 32))
  assert choose(attention.AttentionConfig("pallas"), per_row, per_row) == "pallas"
  assert choose(attention.AttentionConfig("cudnn", fallback="blockwise"), per_row,
                per_row) == "dense"
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  retina = models.build(model_cfg("retina", dtype="bfloat16", attention="cudnn",
                                  attention_fallback="pallas"), V, 64)
  with attention.record_sites() as sites:
    jax.eval_shape(retina.init, jax.random.PRNGKey(0), jnp.ones((1, 16), jnp.int32))
  got = {(s.name.rsplit("/", 1)[-1], s.implementation, bool(s.why)) for s in sites}
  assert got == {("windows", "pallas", True), ("coarsest", "pallas", True)}, got


def test_vanilla_float32_is_refused_by_cudnn_with_the_reason(monkeypatch):
  _forced_gpu(monkeypatch)
  model = models.build(model_cfg("vanilla", attention="cudnn"), V, 64)
  tokens = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ConfigError, match="float32 .cuDNN takes bfloat16 or float16"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)


LOWERED = {"vanilla": "paper14", "hourglass": "paper30", "top_down": "paper30",
           "bottom_up": "paper30", "retina": "paper30"}


@pytest.mark.parametrize("name", sorted(LOWERED))
def test_every_site_of_the_paper_models_lowers_for_a_gpu(name, monkeypatch):
  """Each model at its claim size, 2,048 tokens, bfloat16, head width 64,
  under `cudnn` with the Pallas fallback: the training step (forward and
  backward) lowers for CUDA here, as on a GPU (an abstract H200; cuDNN's
  version check answered), every site on one of the two kernels: cuDNN
  custom calls for the stacks, three Triton kernels per Pallas call."""
  from jax._src.cudnn import fused_attention_stablehlo  # the version check
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(attention, "_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_pallas_interpret", lambda: False)
  monkeypatch.setattr(attention, "gpu_capability", lambda: "9.0")
  from hiertx import config as config_lib
  cfg = dict(config_lib.load(f"configs/{name}.py:size={LOWERED[name]}").model,
             dtype="bfloat16", attention="cudnn", attention_fallback="pallas", max_len=2048,
             scan_layers=True)
  model = models.build(cfg, V, 2048)
  assert model.d_model // model.num_heads == 64
  tokens = jax.ShapeDtypeStruct((2, 2048), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2048), jnp.int32))

  def loss(p, tok):
    seg, pos = jnp.ones_like(tok), jnp.broadcast_to(jnp.arange(2048), tok.shape)
    return model.apply(p, tok, seg, pos).astype(jnp.float32).mean()

  h200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", num_cores=None, platform="gpu"))
  with attention.record_sites() as sites, jax.sharding.use_abstract_mesh(h200):
    text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
        lowering_platforms=("cuda",)).as_text()
  kinds = [s.implementation for s in dict.fromkeys(sites)]
  # Retina's windows and coarsest level are not self-attention: all Pallas.
  assert set(kinds) == ({"pallas"} if name == "retina" else {"cudnn", "pallas"}
                        if name == "bottom_up" else {"cudnn"}), kinds
  # Three kernels per Pallas call (forward, dq, dk/dv); every cuDNN site also
  # carries one for packed rows; retina's windows are a call per level.
  triton = text.count("xla.gpu.triton")
  assert triton % 3 == 0 and triton >= 3 * len(kinds), (triton, kinds)
  assert ("__cudnn$fmha" in text) == ("cudnn" in kinds)
