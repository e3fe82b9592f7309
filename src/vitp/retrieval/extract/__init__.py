"""Feature extraction at any scale, cut as clip-retrieval cuts it:

* :mod:`~vitp.retrieval.extract.reader`    file listing (sorted, split by rank), decoding, DataLoader
* :mod:`~vitp.retrieval.extract.embedder`  the ViT, its dtype and fingerprint, layer, pooling, normalisation
* :mod:`~vitp.retrieval.extract.store`     shards and manifest (resume), then the .npz or embedding store
* :mod:`~vitp.retrieval.extract.world`     one process, or the ranks of a torchrun launch
* :mod:`~vitp.retrieval.extract.run`       the loop: read -> embed -> write
"""

from vitp.retrieval.extract.embedder import FeatureModel, extraction_settings, load_feature_model
from vitp.retrieval.extract.run import ExtractionResult, embed_files, extract_features

__all__ = [
    "ExtractionResult",
    "FeatureModel",
    "embed_files",
    "extract_features",
    "extraction_settings",
    "load_feature_model",
]
