"""Stage 2: image retrieval with the ViT.

    images --features--> .npz --index--> FAISS index + metadata --search / evaluate--> results, metrics

* :mod:`~vitp.retrieval.features`     batched, resumable extraction that skips and reports bad files
* :mod:`~vitp.retrieval.feature_file` the .npz format, its settings, and the compatibility check
* :mod:`~vitp.retrieval.index`        FAISS index (any factory string, GPU when present) saved with metadata
* :mod:`~vitp.retrieval.rerank`       PCA / whitening, query expansion (average, alpha), DBA
* :mod:`~vitp.retrieval.metrics`      Top-K, precision@K, mAP@K, full-ranking mAP in chunks
* :mod:`~vitp.retrieval.evaluate`     the evaluation run and its report
* :mod:`~vitp.retrieval.search`       searching with query images or features; JSON / CSV output
* :mod:`~vitp.retrieval.pictures`     contact sheets and per-class charts
"""

from vitp.retrieval.evaluate import EvaluationReport, evaluate_retrieval
from vitp.retrieval.feature_file import FeatureSet, IncompatibleFeaturesError, load_features, save_features
from vitp.retrieval.features import extract_features, load_feature_model
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import PCAWhitening, weighted_expansion
from vitp.retrieval.search import SearchResults, embed_queries, search_index

__all__ = [
    "EvaluationReport",
    "FeatureSet",
    "IncompatibleFeaturesError",
    "PCAWhitening",
    "RetrievalIndex",
    "SearchResults",
    "embed_queries",
    "evaluate_retrieval",
    "extract_features",
    "load_feature_model",
    "load_features",
    "save_features",
    "search_index",
    "weighted_expansion",
]
