"""Scores: Recall@K, mAP@200 / P@200 (SBIR convention), fusion rules, the batch protocol.

Expected numbers are worked out by hand in the comments.
"""

# ruff: noqa: E741 - D, I are FAISS's names for scores and ids (as in faiss and its docs)

from __future__ import annotations

import numpy as np
import pytest

from pipeline.retrieval import (
    average_precision_at_k,
    batch_protocol_ranks,
    batch_recall,
    fuse_max,
    fuse_mean,
    fuse_softmax_max,
    log_partition,
    map_at_k,
    precision_at_k,
    recall_at_k,
    relevance,
    sign_test_p,
    target_ranks,
)

# ---------------------------------------------------------------- Recall@K


def test_recall_at_k_by_hand() -> None:
    I = np.array([
        [5, 3, 9, 1, 2, 7, 8, 0, 4, 6],    # target 5 at rank 1
        [0, 1, 3, 2, 4, 5, 6, 7, 8, 9],    # target 2 at rank 4
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],    # target 3 at rank 7
        [0, 1, 2, 3, 4, 5, 6, 7, 8, -1],   # target 11 absent
    ])
    targets = np.array([5, 2, 3, 11])
    assert target_ranks(I, targets).tolist() == [1, 4, 7, 11]
    # R@1 = 1/4, R@5 = 2/4, R@10 = 3/4.
    assert recall_at_k(I, targets) == {1: 0.25, 5: 0.5, 10: 0.75}


def test_recall_needs_long_enough_lists() -> None:
    I = np.array([[2, 0, 1], [1, 2, 0]])
    with pytest.raises(ValueError, match="Recall@5 needs short lists of at least 5"):
        recall_at_k(I, np.array([0, 0]))
    # A 3-photo gallery is complete in 3 columns: R@5 = R@10 = R@3 = 1.
    assert recall_at_k(I, np.array([0, 0]), gallery_size=3) == {1: 0.0, 5: 1.0, 10: 1.0}


# ---------------------------------------------------------------- mAP@k and P@k

# Gallery rows 0..5 under ids 100..105.
GALLERY_IDS = np.array([100, 101, 102, 103, 104, 105])
GALLERY_LABELS = np.array(["cat", "dog", "cat", "bird", "dog", "cat"])
QUERY_LABELS = np.array(["cat", "dog", "fish"])
I_LABELLED = np.array([
    [101, 100, 102, 103, 105, 104],  # dog cat cat bird cat dog: hits at ranks 2, 3, 5 (R = 3)
    [101, 104, 100, 102, 103, 105],  # dog dog ...: hits at ranks 1, 2 (R = 2)
    [100, 101, 102, 103, 104, 105],  # no fish in the gallery (R = 0): not scored
])


def test_relevance_maps_ids_to_labels() -> None:
    relevant, num_relevant = relevance(I_LABELLED, QUERY_LABELS, GALLERY_LABELS, GALLERY_IDS)
    assert relevant.astype(int).tolist() == [
        [0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert num_relevant.tolist() == [3, 2, 0]
    # Row numbers instead of ids give the same, with -1 never relevant.
    rows = np.where(I_LABELLED >= 0, I_LABELLED - 100, -1)
    rows[0, 4] = -1
    relevant, _ = relevance(rows, QUERY_LABELS, GALLERY_LABELS)
    assert relevant[0].astype(int).tolist() == [0, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="not in gallery_ids"):
        relevance(np.array([[100, 999]]), QUERY_LABELS[:1], GALLERY_LABELS, GALLERY_IDS)


def test_map_at_200_by_hand() -> None:
    # Query 0: P@2 = 1/2, P@3 = 2/3, P@4 = 2/4, P@5 = 3/5, P@6 = 3/6; divide by min(R=3, 200).
    #   interpolated (SBIR code): max over later ranks -> (2/3 + 2/3 + 3/5) / 3 = 0.644444
    #   plain:                                            (1/2 + 2/3 + 3/5) / 3 = 0.588889
    # Query 1: hits at ranks 1, 2 -> (1 + 1) / 2 = 1 either way. Query 2 (no fish) is skipped.
    args = (I_LABELLED, QUERY_LABELS, GALLERY_LABELS)
    assert map_at_k(*args, k=200, gallery_ids=GALLERY_IDS) == pytest.approx(
        (0.644444 + 1) / 2, abs=1e-6)
    assert map_at_k(*args, k=200, gallery_ids=GALLERY_IDS, interpolated=False) == pytest.approx(
        (0.588889 + 1) / 2, abs=1e-6)


def test_precision_at_200_by_hand() -> None:
    # The gallery has 6 items, so P@200 counts hits in the top 6 over 6: (3/6 + 2/6) / 2.
    assert precision_at_k(I_LABELLED, QUERY_LABELS, GALLERY_LABELS, k=200,
                          gallery_ids=GALLERY_IDS) == pytest.approx(5 / 12)


def test_map_and_precision_cut_at_k() -> None:
    # k = 2: query 0 has one hit (rank 2) in the top 2, divided by min(R=3, 2) = 2 -> 1/2 / 2;
    # query 1 has hits at 1, 2 -> 1. mAP@2 = (0.25 + 1) / 2; P@2 = (1/2 + 2/2) / 2.
    args = (I_LABELLED, QUERY_LABELS, GALLERY_LABELS)
    assert map_at_k(*args, k=2, gallery_ids=GALLERY_IDS) == pytest.approx(0.625)
    assert precision_at_k(*args, k=2, gallery_ids=GALLERY_IDS) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least 6 ids; I has 3"):
        map_at_k(I_LABELLED[:, :3], QUERY_LABELS, GALLERY_LABELS, gallery_ids=GALLERY_IDS)
    with pytest.raises(ValueError, match="nothing to score"):
        map_at_k(I_LABELLED[2:], QUERY_LABELS[2:], GALLERY_LABELS, gallery_ids=GALLERY_IDS)


def _voc_ap_loop(hits: list[bool], num_relevant: int, k: int) -> float:
    """Reference: area under the interpolated precision-recall curve, recall over min(R, k)."""
    hits = hits[:k]
    precision, found = [], 0
    for i, hit in enumerate(hits):
        found += hit
        precision.append(found / (i + 1))
    total = min(num_relevant, k)
    return sum(max(precision[i:]) / total for i, hit in enumerate(hits) if hit)


def test_average_precision_matches_a_loop_on_random_lists() -> None:
    rng = np.random.default_rng(0)
    relevant = rng.random((50, 300)) < 0.2
    num_relevant = relevant.sum(axis=1) + rng.integers(0, 40, size=50)
    for k in (1, 10, 200):
        ap = average_precision_at_k(relevant, num_relevant, k=k)
        expected = [_voc_ap_loop(list(row), r, k) for row, r in zip(relevant, num_relevant)]
        assert np.allclose(ap, expected)
    assert np.isnan(average_precision_at_k(relevant[:1], np.array([0]))).all()


# ---------------------------------------------------------------- fusion


def test_fuse_max_by_hand() -> None:
    sim_sketch = np.array([[0.2, 0.9, -0.1], [0.0, 0.3, 0.4]])
    sim_text = np.array([[0.5, 0.1, -0.3], [0.1, 0.2, 0.6]])
    assert np.allclose(fuse_max(sim_sketch, sim_text), [[0.5, 0.9, -0.1], [0.1, 0.3, 0.6]])
    with pytest.raises(ValueError, match="same shape"):
        fuse_max(sim_sketch, sim_text[:1])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_softmax_max_is_the_max_of_two_softmax_rows() -> None:
    """The authors' rule, densely: p = softmax(100 cos) per query over the gallery, the larger
    of the two per gallery item. fuse_softmax_max gives its log, so the same order."""
    rng = np.random.default_rng(0)
    sim_a, sim_b = rng.uniform(-0.2, 0.9, (5, 30)), rng.uniform(0.1, 0.35, (5, 30))
    dense = np.maximum(_softmax(100 * sim_a), _softmax(100 * sim_b))
    np.testing.assert_allclose(np.exp(fuse_softmax_max(sim_a, sim_b)), dense, rtol=1e-9)
    # With partitions over a larger gallery (these 30 columns are part of it).
    rest_a, rest_b = rng.uniform(-0.2, 0.9, (5, 70)), rng.uniform(0.1, 0.35, (5, 70))
    full_a, full_b = (np.concatenate(p, axis=1) for p in ((sim_a, rest_a), (sim_b, rest_b)))
    dense = np.maximum(_softmax(100 * full_a), _softmax(100 * full_b))[:, :30]
    x = rng.normal(size=(5, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert log_partition(x, [np.eye(8)[:3], np.eye(8)[3:]]).shape == (5,)
    np.testing.assert_allclose(
        log_partition(x, [np.eye(8)[:3], np.eye(8)[3:]]),
        np.log(np.exp(100 * x.astype(np.float64)).sum(axis=1)), rtol=1e-6)
    log_z_a = np.log(np.exp(100 * full_a).sum(axis=1))
    log_z_b = np.log(np.exp(100 * full_b).sum(axis=1))
    np.testing.assert_allclose(np.exp(fuse_softmax_max(sim_a, sim_b, log_z_a, log_z_b)), dense,
                               rtol=1e-9)
    # Why it matters: a text query's cosines sit far below an image query's, so cosine-max
    # lets the image decide; the softmax puts each query on its own scale.
    image = np.array([[0.80, 0.79, 0.78]])   # prefers item 0, not by much
    text = np.array([[0.20, 0.20, 0.30]])    # is sure about item 2
    assert np.argmax(fuse_max(image, text)) == 0
    assert np.argmax(fuse_softmax_max(image, text)) == 2


def test_fuse_mean_by_hand() -> None:
    # [3, 0] -> [1, 0]; [0, 2] -> [0, 1]; mean [.5, .5] -> [1/sqrt 2, 1/sqrt 2].
    fused = fuse_mean(np.array([[3.0, 0.0]]), np.array([[0.0, 2.0]]))
    assert fused.dtype == np.float32
    assert np.allclose(fused, [[2**-0.5, 2**-0.5]])


# ---------------------------------------------------------------- batch protocol


def test_batch_protocol_by_hand() -> None:
    # Batches of 2: {0, 1} and {2}. Query 1 = [0.6, -0.8] is closer to photo 0 (0.6) than to
    # its own photo 1 (-0.28): rank 2. Query 2 is alone in its batch: rank 1.
    q = np.array([[1.0, 0.0], [0.6, -0.8], [0.6, 0.8]])
    g = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ranks = batch_protocol_ranks(q, g, batch_size=2)
    assert ranks.tolist() == [1, 2, 1]
    assert batch_recall(ranks, ks=(1, 5)) == {1: pytest.approx(2 / 3), 5: 1.0}
    # Fused with a text query [0, 1]: photo 0 max(0.6, 0) = 0.6, own photo max(-0.28, 0.8) = 0.8.
    extra = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert batch_protocol_ranks(q, g, batch_size=2, q_emb_extra=extra,
                                fusion="cosine-max").tolist() == [1, 1, 1]
    # Ties count against the query: identical photos share the worst rank.
    assert batch_protocol_ranks(q[:2], np.ones((2, 2)), batch_size=2).tolist() == [2, 2]


def _batch_ranks_loop(q, g, batch_size, extra=None, softmax=False):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if extra is not None:
        extra = extra / np.linalg.norm(extra, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        first = (i // batch_size) * batch_size
        members = range(first, min(first + batch_size, len(q)))
        a = [float(q[i] @ g[j]) for j in members]
        sims = a
        if extra is not None and softmax:  # the authors': softmax(100 cos) over the batch
            b = [float(extra[i] @ g[j]) for j in members]
            pa_, pb_ = (np.exp(100 * np.array(v, dtype=np.float64)) for v in (a, b))
            sims = np.maximum(pa_ / pa_.sum(), pb_ / pb_.sum()).tolist()
        elif extra is not None:
            sims = [max(s, float(extra[i] @ g[j])) for s, j in zip(a, members)]
        own = sims[i - first]
        ranks.append(sum(s >= own for s in sims))
    return ranks


@pytest.mark.parametrize("n, batch_size", [(53, 24), (48, 24), (7, 24), (10, 1)])
def test_batch_protocol_matches_a_loop(n: int, batch_size: int) -> None:
    rng = np.random.default_rng(n)
    g = rng.normal(size=(n, 8)).astype(np.float32)
    q = (g + rng.normal(scale=1.0, size=(n, 8))).astype(np.float32)
    extra = (g + rng.normal(scale=1.5, size=(n, 8))).astype(np.float32)
    assert batch_protocol_ranks(q, g, batch_size).tolist() == _batch_ranks_loop(q, g, batch_size)
    assert (batch_protocol_ranks(q, g, batch_size, q_emb_extra=extra,
                                 fusion="cosine-max").tolist()
            == _batch_ranks_loop(q, g, batch_size, extra))
    assert (batch_protocol_ranks(q, g, batch_size, q_emb_extra=extra).tolist()
            == _batch_ranks_loop(q, g, batch_size, extra, softmax=True))
    ranks = batch_protocol_ranks(q, g, batch_size)
    last = n - (n - 1) // batch_size * batch_size  # size of the last (maybe partial) batch
    assert ranks.min() >= 1 and ranks[-last:].max() <= last


def test_sign_test_by_hand() -> None:
    # 6 wins, 0 losses: 2 * (1/2)^6; 1 win, 7 losses: 2 * (1 + 8) / 2^8; a tie or nothing to
    # compare: no evidence either way.
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert sign_test_p(1, 7) == pytest.approx(2 * 9 / 256)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="counts"):
        sign_test_p(-1, 2)


def test_sign_test_matches_exact_binomial_sums() -> None:
    from math import comb

    for wins in range(0, 40, 3):
        for losses in range(0, 40, 5):
            n, m = wins + losses, min(wins, losses)
            exact = min(1.0, 2 * sum(comb(n, i) for i in range(m + 1)) / 2**n) if n else 1.0
            assert sign_test_p(wins, losses) == pytest.approx(exact, rel=1e-9), (wins, losses)
            assert sign_test_p(wins, losses) == sign_test_p(losses, wins)
    # Large counts stay finite and ordered: the same 1% edge is stronger evidence at 100x n.
    assert 0 < sign_test_p(505_000, 495_000) < sign_test_p(5_050, 4_950) < 1
