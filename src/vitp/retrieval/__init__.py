"""Stage 2: image retrieval with the ViT.

    images --extract--> .npz | embedding store --index--> FAISS index | Milvus collection --search / evaluate / serve--> results

* :mod:`~vitp.retrieval.extract`          batched, resumable, torchrun-sharded extraction that skips and reports bad files
* :mod:`~vitp.retrieval.feature_file`     the .npz format, its settings, and the compatibility check
* :mod:`~vitp.retrieval.embedding_store`  the sharded store (.npy + parquet) for galleries larger than RAM
* :mod:`~vitp.retrieval.index`            the index interface search / evaluate / serve use, whatever the engine
* :mod:`~vitp.retrieval.backends`         FAISS (memory-budgeted, PCA inside, GPU when present) and Milvus
* :mod:`~vitp.retrieval.rerank`           query expansion (average, alpha), DBA
* :mod:`~vitp.retrieval.metrics`          Top-K, precision@K, mAP@K, full-ranking mAP in chunks
* :mod:`~vitp.retrieval.evaluate`         the evaluation run and its report
* :mod:`~vitp.retrieval.search`           searching with query images or features; JSON / CSV output
* :mod:`~vitp.retrieval.pictures`         contact sheets and per-class charts
"""

from vitp.errors import RetrievalError
from vitp.retrieval.embedding_store import EmbeddingStore, open_gallery
from vitp.retrieval.evaluate import EvaluationReport, evaluate_retrieval
from vitp.retrieval.extract import extract_features, load_feature_model
from vitp.retrieval.feature_file import FeatureSet, load_features, save_features
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.rerank import weighted_expansion
from vitp.retrieval.search import SearchResults, embed_queries, search_index

__all__ = [
    "EmbeddingStore",
    "EvaluationReport",
    "FeatureSet",
    "RetrievalError",
    "RetrievalIndex",
    "SearchResults",
    "embed_queries",
    "evaluate_retrieval",
    "extract_features",
    "load_feature_model",
    "load_features",
    "open_gallery",
    "save_features",
    "search_index",
    "weighted_expansion",
]
