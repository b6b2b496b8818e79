"""Losses against plain float64 numpy loops, plus behavioural properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmil_jax import losses

C = 5
L = 5


# ----------------------------------------------------------------------------------------------
# Independent float64 references (loops)


def ref_multi_hot(seq, num_classes):
    out = np.zeros((len(seq), num_classes))
    for b, row in enumerate(seq):
        for c in row:
            if c > 0:
                out[b, c - 1] = 1.0
    return out


def ref_grades(seq, num_classes, order):
    out = np.zeros((len(seq), num_classes))
    for b, row in enumerate(seq):
        edits = [int(c) for c in row if c > 0]
        m = len(edits)
        for j, c in enumerate(edits, start=1):
            out[b, c - 1] = (m - j + 1) if order == "first_high" else j
    return out


def ref_bce(logits, targets, weights=None):
    x = np.asarray(logits, np.float64).reshape(len(logits), -1)
    t = np.asarray(targets, np.float64).reshape(len(logits), -1)
    per = []
    for b in range(x.shape[0]):
        terms = [t[b, k] * np.logaddexp(0.0, -x[b, k]) + (1 - t[b, k]) * np.logaddexp(0.0, x[b, k])
                 for k in range(x.shape[1])]
        per.append(np.mean(terms))
    per = np.array(per)
    if weights is None:
        return per.mean()
    w = np.asarray(weights, np.float64)
    return 0.0 if w.sum() == 0 else float((w * per).sum() / w.sum())


def ref_pair_sims(emb):
    e = np.asarray(emb, np.float64)
    out = []
    for img in e:
        img = img / np.linalg.norm(img, axis=-1, keepdims=True)
        n = img.shape[0]
        out.append([float(img[i] @ img[j]) for i in range(n) for j in range(i + 1, n)])
    return out


def ref_lowest(emb, m):
    return np.array([sorted(s)[:m] for s in ref_pair_sims(emb)])


def ref_fake_logit(emb, bias, tau, m):
    out = []
    for s in ref_lowest(emb, m):
        w = np.exp(-s / tau)
        w = w / w.sum()
        out.append((bias - np.sum(w * s)) / tau)
    return np.array(out)


def ref_rank(logits, seq, order, weights=None):
    z = np.asarray(logits, np.float64)
    g = ref_grades(seq, z.shape[1], order)
    total, count = 0.0, 0.0
    for b in range(z.shape[0]):
        s, pairs = 0.0, 0
        for a in range(z.shape[1]):
            for c in range(z.shape[1]):
                if g[b, a] < g[b, c]:
                    s += np.exp(z[b, a] - z[b, c])
                    pairs += 1
        if pairs:
            w = 1.0 if weights is None else float(weights[b])
            total += w * np.log1p(s)
            count += w
    return total / count if count else 0.0


def ref_patch_map(emb):
    e = np.asarray(emb, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    b, n, _ = e.shape
    out = np.zeros((b, n))
    for k in range(b):
        for i in range(n):
            out[k, i] = np.mean([e[k, i] @ e[k, j] for j in range(n) if j != i])
    return out


def random_seq(rng, batch):
    seq = np.zeros((batch, L), np.int32)
    for b in range(batch):
        m = rng.integers(0, L + 1)
        seq[b, :m] = rng.permutation(C)[:m] + 1
    return seq


def random_outputs(rng, batch, n, e=8, c=C):
    emb = rng.normal(size=(batch, n, e)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return {
        "class_logits": rng.normal(scale=2.0, size=(batch, c)).astype(np.float32),
        "patch_logits": rng.normal(scale=2.0, size=(batch, c)).astype(np.float32),
        "mil_emb": emb,
        "mil_bias": np.float32(rng.uniform(0.0, 1.0)),
    }


SEEDS = [0, 1, 2]

# Jitted entry points (one XLA compile per shape is much cheaper than op-by-op dispatch); the
# eager path is checked against them in test_gradients_finite_and_jit_matches_eager.
multi_hot = jax.jit(losses.multi_hot, static_argnums=1)
rank_grades = jax.jit(losses.rank_grades, static_argnums=(1, 2))
bce_loss = jax.jit(losses.bce_loss)
lowest_similarities = jax.jit(losses.lowest_similarities, static_argnums=1)
mil_rank_weights = jax.jit(losses.mil_rank_weights, static_argnums=1)
mil_fake_logit = jax.jit(losses.mil_fake_logit, static_argnums=(2, 3))
mil_fake_prob = jax.jit(losses.mil_fake_prob, static_argnums=(2, 3))
cls_loss = jax.jit(losses.cls_loss, static_argnums=(3, 4))
rank_loss = jax.jit(losses.rank_loss, static_argnums=2)
patch_similarity_map = jax.jit(losses.patch_similarity_map)
total_loss = jax.jit(losses.total_loss, static_argnames=(
    "alpha", "lambda1", "lambda2", "tau", "num_lowest", "rank_order", "use_rank"))


# ----------------------------------------------------------------------------------------------
# Against the references. Seeds loop inside a test so one compiled shape serves them all.


def test_labels_match_reference():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        seq = random_seq(rng, 8)
        np.testing.assert_array_equal(multi_hot(seq, C), ref_multi_hot(seq, C))
        for order in ("first_high", "last_high"):
            np.testing.assert_array_equal(rank_grades(seq, C, order), ref_grades(seq, C, order))


def test_grades_hand_example():
    seq = np.array([[1, 2, 4, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(losses.rank_grades(seq, C, "first_high"),
                                  [[3, 2, 0, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(losses.rank_grades(seq, C, "last_high"),
                                  [[1, 2, 0, 3, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(losses.multi_hot(seq, C), [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="order"):
        losses.rank_grades(seq, C, "middle")


def test_bce_matches_reference():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.normal(scale=5.0, size=(8, C)).astype(np.float32)
        t = (rng.uniform(size=(8, C)) > 0.5).astype(np.float32)
        w = rng.uniform(size=8).astype(np.float32)
        np.testing.assert_allclose(bce_loss(x, t), ref_bce(x, t), rtol=1e-5)
        np.testing.assert_allclose(bce_loss(x, t, w), ref_bce(x, t, w), rtol=1e-5)
        np.testing.assert_allclose(bce_loss(x[:, 0], t[:, 0]), ref_bce(x[:, :1], t[:, :1]),
                                   rtol=1e-5)


def test_bce_stable_and_zero_weights():
    x = np.array([[200.0, -200.0], [-200.0, 200.0]], np.float32)
    t = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    # second row is wrong by 200 nats per class
    np.testing.assert_allclose(bce_loss(x, t), 100.0, rtol=1e-6)
    np.testing.assert_allclose(bce_loss(x, t, np.array([1.0, 0.0])), 0.0, atol=1e-6)
    assert float(bce_loss(x, t, np.zeros(2))) == 0.0
    g = jax.grad(lambda z: bce_loss(z, t, jnp.zeros(2)))(jnp.asarray(x))
    assert np.all(np.isfinite(g)) and np.all(g == 0)


@pytest.mark.parametrize("n,m", [(16, None), (36, 10), (64, 64), (16, 10_000)])
def test_lowest_similarities_match_reference(n, m):
    pairs = n * (n - 1) // 2
    m_eff = n if m is None else min(m, pairs)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(4, n, 8)).astype(np.float32) * rng.uniform(0.5, 3.0)
        got = np.asarray(lowest_similarities(emb, m))
        assert got.shape == (4, m_eff)
        np.testing.assert_allclose(got, ref_lowest(emb, m_eff), atol=2e-6)
        assert np.all(np.diff(got, axis=-1) >= 0)


def test_top_k_equals_full_sort():
    rng = np.random.default_rng(7)
    emb = jnp.asarray(rng.normal(size=(3, 24, 6)), jnp.float32)
    s = losses.pairwise_similarities(emb)
    iu = np.triu_indices(24, k=1)
    full = jnp.sort(s[:, iu[0], iu[1]], axis=-1)
    np.testing.assert_array_equal(lowest_similarities(emb, 10_000), full)
    np.testing.assert_array_equal(lowest_similarities(emb, 17), full[:, :17])


def test_lowest_similarities_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_lowest"):
        losses.lowest_similarities(np.ones((1, 4, 3)), 0)
    with pytest.raises(ValueError, match="N >= 2"):
        losses.lowest_similarities(np.ones((1, 1, 3)), 1)
    with pytest.raises(ValueError, match=r"\(B, N, E\)"):
        losses.lowest_similarities(np.ones((4, 3)), 1)


@pytest.mark.parametrize("batch,n", [(8, 16), (5, 64)])
def test_mil_logit_weights_and_cls_match_reference(batch, n):
    bias, tau, m = 0.5, 0.2, n
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(batch, n, 8)).astype(np.float32)
        is_fake = rng.integers(0, 2, size=batch)
        w = rng.uniform(size=batch)
        logit = ref_fake_logit(emb, bias, tau, m)
        np.testing.assert_allclose(mil_fake_logit(emb, bias, tau, None), logit, rtol=1e-4,
                                   atol=1e-4)
        sims = lowest_similarities(emb, m)
        p = np.asarray(mil_rank_weights(sims, tau))
        ref_p = np.exp(-ref_lowest(emb, m) / tau)
        np.testing.assert_allclose(p, ref_p / ref_p.sum(-1, keepdims=True), rtol=1e-4, atol=1e-7)
        # P(x;k) is non-increasing over ascending similarities
        assert np.all(np.diff(p, axis=-1) <= 1e-7)
        np.testing.assert_allclose(cls_loss(emb, is_fake, bias, tau, m),
                                   ref_bce(logit, is_fake), rtol=1e-4)
        np.testing.assert_allclose(cls_loss(emb, is_fake, bias, tau, m, weights=w),
                                   ref_bce(logit, is_fake, w), rtol=1e-4)


def test_rank_loss_matches_reference():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        seq = random_seq(rng, 8)
        seq[0] = 0  # at least one image without pairs
        z = rng.normal(scale=3.0, size=(8, C)).astype(np.float32)
        w = rng.uniform(size=8)
        for order in ("first_high", "last_high"):
            np.testing.assert_allclose(rank_loss(z, seq, order), ref_rank(z, seq, order),
                                       rtol=1e-5)
            np.testing.assert_allclose(rank_loss(z, seq, order, w), ref_rank(z, seq, order, w),
                                       rtol=1e-5)


def test_rank_loss_large_logits_stable():
    seq = np.array([[2, 1, 0, 0, 0]])
    z = np.array([[-80.0, 90.0, 0.0, 0.0, 0.0]], np.float32)  # badly ordered by a wide margin
    # grades: class 2 -> 2, class 1 -> 1, others 0. Pairs (low, high): (1, 2): exp(-80 - 90);
    # (absent, 2): 3 x exp(0 - 90); (absent, 1): 3 x exp(0 + 80)
    expected = np.log1p(3 * np.exp(80.0) + 3 * np.exp(-90.0) + np.exp(-170.0))
    np.testing.assert_allclose(rank_loss(z, seq), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [16, 49])
def test_patch_similarity_map_matches_reference(n):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(3, n, 8)).astype(np.float32)
        np.testing.assert_allclose(patch_similarity_map(emb), ref_patch_map(emb), atol=2e-6)


def _ref_total(out, batch, alpha=1.0, lambda1=1.0, lambda2=1.0, tau=0.2, m=None,
               order="first_high", use_rank=True):
    m = out["mil_emb"].shape[1] if m is None else m
    l_cls = ref_bce(ref_fake_logit(out["mil_emb"], float(out["mil_bias"]), tau, m), batch["is_fake"])
    c = out["class_logits"].shape[1]
    if c == 1:
        y, w = np.asarray(batch["is_fake"], np.float64)[:, None], None
    else:
        y, w = ref_multi_hot(batch["label"], c), batch.get("has_seq")
    l_u = ref_bce(out["class_logits"], y, w)
    l_v = ref_bce(out["patch_logits"], y, w)
    l_rank = 0.0
    if use_rank and c > 1:
        z = (out["class_logits"].astype(np.float64) + out["patch_logits"]) / 2
        l_rank = ref_rank(z, batch["label"], order, w)
    total = alpha * l_cls + lambda1 * (l_u + l_v) + lambda2 * l_rank
    return total, {"l_cls": l_cls, "l_bce_u": l_u, "l_bce_v": l_v, "l_rank": l_rank}


def _check_total(out, batch, **kw):
    loss, aux = total_loss(out, batch, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("num_lowest", "rank_order")}
    ref, ref_aux = _ref_total(out, batch, m=kw.get("num_lowest"),
                              order=kw.get("rank_order", "first_high"), **ref_kw)
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    for k, v in ref_aux.items():
        np.testing.assert_allclose(aux[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert 0.0 <= float(aux["mil_fake_prob"]) <= 1.0
    return ref_aux


def test_total_loss_matches_reference():
    # default hyper-parameters, with has_seq
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        out = random_outputs(rng, 8, 16)
        seq = random_seq(rng, 8)
        batch = {"label": seq, "is_fake": (seq[:, 0] > 0).astype(np.int32),
                 "has_seq": (rng.uniform(size=8) > 0.4).astype(np.float32)}
        _check_total(out, batch)
    # every hyper-parameter changed, no has_seq, N = 64
    kw = dict(alpha=0.7, lambda1=1.3, lambda2=0.5, tau=0.3, num_lowest=20, rank_order="last_high")
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        out = random_outputs(rng, 8, 64)
        seq = random_seq(rng, 8)
        batch = {"label": seq, "is_fake": (seq[:, 0] > 0).astype(np.int32)}
        ref_aux = _check_total(out, batch, **kw)
        assert ref_aux["l_rank"] > 0
    loss_nr, aux_nr = total_loss(out, batch, use_rank=False, **kw)
    ref_nr, _ = _ref_total(out, batch, 0.7, 1.3, 0.5, 0.3, 20, "last_high", use_rank=False)
    assert float(aux_nr["l_rank"]) == 0.0
    np.testing.assert_allclose(loss_nr, ref_nr, rtol=1e-4)


def test_total_loss_binary_mode():
    rng = np.random.default_rng(3)
    out = random_outputs(rng, 8, 16, c=1)
    is_fake = np.array([0, 1, 1, 0, 1, 0, 1, 1], np.int32)
    # binary datasets carry all-zero sequences and may have has_seq = 0: targets are still is_fake
    batch = {"label": np.zeros((8, L), np.int32), "is_fake": is_fake, "has_seq": np.zeros(8)}
    ref_aux = _check_total(out, batch)
    np.testing.assert_allclose(ref_aux["l_bce_u"], ref_bce(out["class_logits"], is_fake[:, None]))
    assert ref_aux["l_bce_u"] > 0 and ref_aux["l_rank"] == 0.0


def test_has_seq_masks_sequence_losses_only():
    rng = np.random.default_rng(4)
    out = random_outputs(rng, 8, 16)
    seq = random_seq(rng, 8)
    seq[1] = [2, 5, 1, 0, 0]
    has_seq = np.array([1, 1, 0, 1, 0, 0, 1, 1], np.float32)
    batch = {"label": seq, "is_fake": (seq[:, 0] > 0).astype(np.int32), "has_seq": has_seq}
    _, aux = total_loss(out, batch)
    # sequence losses equal those of the sub-batch with valid labels ...
    keep = has_seq > 0
    sub_out = {k: (v[keep] if np.ndim(v) else v) for k, v in out.items()}
    _, sub_ref = _ref_total(sub_out, {"label": seq[keep], "is_fake": batch["is_fake"][keep]})
    for k in ("l_bce_u", "l_bce_v", "l_rank"):
        np.testing.assert_allclose(aux[k], sub_ref[k], rtol=1e-5, err_msg=k)
    # ... while L_CLS uses every sample
    l_cls_all = ref_bce(ref_fake_logit(out["mil_emb"], float(out["mil_bias"]), 0.2, 16),
                        batch["is_fake"])
    np.testing.assert_allclose(aux["l_cls"], l_cls_all, rtol=1e-5)
    # no sequence labels at all: sequence losses are exactly 0
    batch["has_seq"] = np.zeros(8, np.float32)
    _, aux0 = total_loss(out, batch)
    for k in ("l_bce_u", "l_bce_v", "l_rank"):
        assert float(aux0[k]) == 0.0


# ----------------------------------------------------------------------------------------------
# Properties


def test_rank_loss_falls_as_logits_follow_grades():
    rng = np.random.default_rng(5)
    seq = random_seq(rng, 8)
    seq[:, 0] = np.where(seq[:, 0] == 0, 3, seq[:, 0])  # every image has pairs
    for order in ("first_high", "last_high"):
        g = ref_grades(seq, C, order)
        noise = rng.normal(scale=0.3, size=g.shape)
        values = [float(rank_loss((t * g + noise).astype(np.float32), seq, order))
                  for t in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
        assert all(a > b for a, b in zip(values, values[1:])), values
        assert values[0] > 0.5
        perfect = float(rank_loss((30.0 * g).astype(np.float32), seq, order))
        assert perfect < 1e-10


def test_rank_loss_zero_for_all_zero_sequences():
    rng = np.random.default_rng(6)
    z = jnp.asarray(rng.normal(scale=5.0, size=(4, C)), jnp.float32)
    seq = np.zeros((4, L), np.int32)
    assert float(rank_loss(z, seq)) == 0.0
    g = jax.jit(jax.grad(losses.rank_loss))(z, seq)
    assert np.all(g == 0)


def test_last_high_reverses_the_sequence():
    rng = np.random.default_rng(8)
    seq = random_seq(rng, 8)
    rev = np.zeros_like(seq)
    for b, row in enumerate(seq):
        edits = [c for c in row if c > 0][::-1]
        rev[b, :len(edits)] = edits
    np.testing.assert_array_equal(rank_grades(seq, C, "last_high"),
                                  rank_grades(rev, C, "first_high"))
    z = rng.normal(size=(8, C)).astype(np.float32)
    np.testing.assert_allclose(rank_loss(z, seq, "last_high"),
                               rank_loss(z, rev, "first_high"), rtol=1e-6)
    # logits that follow the first-high order are good for first_high and bad for last_high
    seq1 = np.array([[1, 2, 3, 4, 5]])
    z1 = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], np.float32) * 20
    assert float(rank_loss(z1, seq1, "first_high")) < 1e-6
    assert float(rank_loss(z1, seq1, "last_high")) > 10.0


def _clustered(rng, n, e, direction, noise=0.05):
    x = direction[None, :] + noise * rng.normal(size=(n, e))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cls_loss_prefers_orthogonal_fake_patches():
    rng = np.random.default_rng(9)
    n, e, batch = 16, 16, 8
    is_fake = np.array([0, 1] * (batch // 2))
    basis = np.linalg.qr(rng.normal(size=(e, e)))[0]
    structured = []
    for b in range(batch):
        img = _clustered(rng, n, e, basis[:, 0])
        if is_fake[b]:
            k = int(rng.integers(4, 8))
            img[:k] = _clustered(rng, k, e, basis[:, 1])  # manipulated patches, orthogonal
        structured.append(img)
    structured = np.stack(structured).astype(np.float32)
    random_emb = rng.normal(size=(batch, n, e)).astype(np.float32)
    good = float(cls_loss(structured, is_fake, 0.5, 0.2, n))
    bad = float(cls_loss(random_emb, is_fake, 0.5, 0.2, n))
    assert good < 0.2 < bad
    p = np.asarray(mil_fake_prob(structured, 0.5, 0.2, n))
    # genuine: m(x) ~ 0.95 -> p ~ sigmoid(-2.25); fake: m(x) ~ 0 -> p ~ sigmoid(2.5)
    assert np.all(p[is_fake == 1] > 0.9) and np.all(p[is_fake == 0] < 0.15)
    # the localization map marks the orthogonal patches as least similar
    a = np.asarray(patch_similarity_map(structured))
    assert a[1, 0] < a[1, -1]


def test_gradients_finite_and_jit_matches_eager():
    rng = np.random.default_rng(10)
    out = {k: jnp.asarray(v) for k, v in random_outputs(rng, 8, 16).items()}
    seq = random_seq(rng, 8)
    seq[:3] = 0
    batch = {"label": jnp.asarray(seq), "is_fake": jnp.asarray((seq[:, 0] > 0).astype(np.int32)),
             "has_seq": jnp.asarray(np.array([1, 1, 1, 1, 0, 1, 0, 1], np.float32))}
    # duplicate patches give tied similarities; top_k must still differentiate
    out["mil_emb"] = out["mil_emb"].at[0, 1].set(out["mil_emb"][0, 0])
    loss, aux = total_loss(out, batch)
    assert loss.dtype == jnp.float32 and loss.shape == () and np.isfinite(loss)
    for k, v in aux.items():
        assert v.dtype == jnp.float32 and v.shape == () and np.isfinite(v), k
    grads = jax.jit(jax.grad(lambda o: losses.total_loss(o, batch)[0]))(out)
    for k, g in grads.items():
        assert g.shape == np.shape(out[k]) and np.all(np.isfinite(g)), k
        assert np.any(g != 0), k
    # eager and jitted give the same numbers
    z, y = out["class_logits"], losses.multi_hot(seq, C)
    np.testing.assert_allclose(losses.bce_loss(z, y), bce_loss(z, y), rtol=1e-6)
    # bfloat16 inputs are cast to float32
    logit16 = mil_fake_logit(out["mil_emb"].astype(jnp.bfloat16), jnp.bfloat16(0.5), 0.2, 16)
    assert logit16.dtype == jnp.float32 and np.all(np.isfinite(logit16))
