"""Search, evaluation and query expansion: vitp against the seed's numpy/FAISS code, in one run.

    python benchmarks/search.py [--gallery 100000] [--queries 10000] [--dim 1024] [--classes 100]
                                [--k 5] [--qe 5] [--seed_qe_queries 50]

Synthetic L2-normalised features with class structure (class centre + noise). Each phase prints the
seed's time, vitp's time and the ratio, plus the peak memory the phase added (Linux VmHWM, reset
before each phase), next to the size the full query x gallery score matrix would have.

* top-K search: the seed's ``build_faiss_index`` (IndexFlatL2) + ``search`` against vitp's index
  (a FAISS IndexFlatIP, same ranking on unit vectors, searched by FAISS in chunks of queries). vitp
  used to search flat indexes itself as blocked torch matrix products; that measured 7.1x the seed
  on one machine but 0.8x on another and 0.7x on a third (30.2 s against FAISS IndexFlatIP's 25.5 s,
  100k x 1024, 10k queries, 2 CPUs), so exact search is FAISS's own again, which also bounds memory.
* evaluation: the seed's ``evaluate_retrieval`` (search + a Python loop per query and K) against
  ``vitp.retrieval.evaluate_retrieval`` (Top-K, P@K, mAP@K vectorised); vitp's full-ranking mAP,
  which the seed does not compute, is timed on its own.
* query expansion: the seed's ``rerank_with_query_expansion`` (per query: distances to the whole
  gallery, full argsort) against vitp's batched expansion + one FAISS search. The seed's loop takes
  minutes per thousand queries, so it runs on ``--seed_qe_queries`` queries and its time is scaled
  to the full query count (each query is an independent pass over the gallery); the output says so.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import faiss
import numpy as np

from peak_memory import reset_peak, status_kb
from vitp.retrieval.evaluate import evaluate_retrieval
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.index import RetrievalIndex


# --------------------------------------------------------------------------------------------------
# The seed's code (vitp-reproduction-guide.zh.md, "3.2 检索与评估" and "5.3 重排序"), minus its prints.


def seed_build_faiss_index(features):
    index = faiss.IndexFlatL2(features.shape[1])
    if faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(features.astype("float32"))
    return index


def seed_evaluate_retrieval(query_features, query_labels, gallery_features, gallery_labels, top_k_list=(1, 3, 5)):
    index = seed_build_faiss_index(gallery_features)
    distances, indices = index.search(query_features.astype("float32"), max(top_k_list))
    results = {}
    for k in top_k_list:
        correct = 0
        for i in range(len(query_labels)):
            if query_labels[i] in gallery_labels[indices[i, :k]]:
                correct += 1
        results[f"Top-{k}"] = correct / len(query_labels)
    return results


def seed_rerank_with_query_expansion(query_features, gallery_features, initial_indices, k1=5):
    reranked_indices = []
    for i in range(len(query_features)):
        top_k1_features = gallery_features[initial_indices[i, :k1]]
        expanded_query = np.mean(np.vstack([query_features[i : i + 1], top_k1_features]), axis=0)
        distances = np.linalg.norm(gallery_features - expanded_query, axis=1)
        reranked_indices.append(np.argsort(distances))
    return np.array(reranked_indices)


# --------------------------------------------------------------------------------------------------
# Measuring


@contextmanager
def measured(results: dict, name: str):
    """Wall time and the peak resident memory added during the block (Linux; 0 where unsupported)."""
    reset_peak()
    before = status_kb("VmRSS")
    start = time.perf_counter()
    yield
    results[name] = (time.perf_counter() - start, max(0, status_kb("VmHWM") - before) * 1024)


def synthetic_features(count, dimension, classes, seed, prefix):
    """Class centres shared by every set (fixed seed 0); samples and labels drawn with ``seed``."""
    centres = np.random.default_rng(0).standard_normal((classes, dimension), dtype=np.float32)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, classes, count)
    vectors = centres[labels] + 4.0 * rng.standard_normal((count, dimension), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = np.array([f"class{c:03d}" for c in range(classes)])[labels]
    paths = np.char.add(np.char.add(f"/{prefix}/", names), np.char.add("/", np.arange(count).astype(str)))
    settings = {"model_fingerprint": "synthetic", "layer": 24, "pool": "mean", "image_size": 448}
    return FeatureSet(vectors, paths, names, settings, prefix)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def line(name, seed_s, ours_s, memory=None, note=""):
    ratio = f"{seed_s / ours_s:7.1f}x" if seed_s else "      -"
    seed = f"{seed_s:8.2f} s" if seed_s else "       -  "
    mem = f"   peak +{gib(memory)}" if memory is not None else ""
    print(f"{name:<34} seed {seed}   vitp {ours_s:8.2f} s   ratio {ratio}{mem}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--qe", type=int, default=5, help="query expansion: top results averaged with the query")
    parser.add_argument("--seed_qe_queries", type=int, default=50, help="queries the seed's QE loop runs on")
    args = parser.parse_args()

    gallery = synthetic_features(args.gallery, args.dim, args.classes, 0, "gallery")
    queries = synthetic_features(args.queries, args.dim, args.classes, 1, "query")
    top_k = sorted({1, 3, args.k})
    full_matrix = args.queries * args.gallery * 4
    print(f"gallery {args.gallery} x {args.dim}, {args.queries} queries, {args.classes} classes, top-{args.k}; "
          f"FAISS {faiss.__version__} on {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs")
    print(f"the full query x gallery float32 score matrix would take {gib(full_matrix)}")
    r: dict[str, tuple[float, int]] = {}

    # Top-K search.
    with measured(r, "seed search"):
        seed_index = seed_build_faiss_index(gallery.features)
        _, seed_ids = seed_index.search(queries.features, args.k)
    with measured(r, "vitp search"):
        index = RetrievalIndex.build(gallery, "Flat", faiss_device="cpu", progress_bar=False)
        scores, ids, _ = index.search(index.prepare_queries(queries.features), args.k)
    same = float((np.sort(seed_ids, 1) == np.sort(ids, 1)).mean())
    del seed_index

    # Evaluation.
    with measured(r, "seed evaluation"):
        seed_results = seed_evaluate_retrieval(queries.features, queries.labels, gallery.features, gallery.labels, top_k)
    with measured(r, "vitp evaluation"):
        report = evaluate_retrieval(queries, gallery, top_k=top_k, full_map=False, faiss_device="cpu", progress_bar=False)
    for k in top_k:
        assert abs(seed_results[f"Top-{k}"] - report.accuracy[k]) < 1e-9, (k, seed_results, report.accuracy)
    with measured(r, "vitp evaluation + full mAP"):
        full = evaluate_retrieval(queries, gallery, top_k=top_k, full_map=True, faiss_device="cpu", progress_bar=False)

    # Query expansion, starting from the top-k already found.
    subset = slice(0, args.seed_qe_queries)
    with measured(r, "seed QE"):
        seed_qe = seed_rerank_with_query_expansion(queries.features[subset], gallery.features, ids[subset], args.qe)
    with measured(r, "vitp QE"):
        prepared = index.prepare_queries(queries.features)
        expanded = index.expand(prepared, scores[:, : args.qe], ids[:, : args.qe], alpha=0.0)
        _, qe_ids = index.top_k(expanded, args.k)
    qe_same = float((seed_qe[:, : args.k] == qe_ids[subset]).all(axis=1).mean())
    seed_qe_scaled = r["seed QE"][0] * args.queries / args.seed_qe_queries

    print()
    line(f"top-{args.k} search (build + search)", r["seed search"][0], r["vitp search"][0], r["vitp search"][1],
         f"   (same top-{args.k} sets: {same:.1%})")
    line("evaluation (Top-K, P@K, mAP@K)", r["seed evaluation"][0], r["vitp evaluation"][0], r["vitp evaluation"][1],
         "   (seed computes Top-K only; Top-K identical)")
    line("evaluation + full-ranking mAP", 0, r["vitp evaluation + full mAP"][0], r["vitp evaluation + full mAP"][1],
         f"   (seed has no mAP; mAP {full.mean_average_precision:.4f})")
    line(f"query expansion (top {args.qe})", seed_qe_scaled, r["vitp QE"][0], r["vitp QE"][1],
         f"   (seed measured on {args.seed_qe_queries} queries: {r['seed QE'][0]:.2f} s, scaled to {args.queries}; "
         f"same top-{args.k}: {qe_same:.0%})")
    print()
    for name in ("vitp evaluation", "vitp evaluation + full mAP", "vitp QE"):
        fraction = r[name][1] / full_matrix
        print(f"{name}: peak added memory {gib(r[name][1])} = {fraction:.1%} of the full score matrix")
    print(f"Top-1/3/{args.k}: " + " ".join(f"{report.accuracy[k]:.4f}" for k in top_k)
          + f"  P@{args.k} {report.precision[args.k]:.4f}  mAP {full.mean_average_precision:.4f}")


if __name__ == "__main__":
    main()
