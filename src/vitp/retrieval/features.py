"""Where feature extraction used to live; it is now the :mod:`vitp.retrieval.extract` package
(reader, embedder, store, run). The names below keep older imports working."""

from vitp.retrieval.extract.embedder import (  # noqa: F401
    DTYPES,
    POOLS,
    FeatureModel,
    embed_batch,
    extraction_settings,
    load_feature_model,
    model_fingerprint,
)
from vitp.retrieval.extract.reader import ExtractionError  # noqa: F401
from vitp.retrieval.extract.run import ExtractionResult, embed_files, extract_features  # noqa: F401
from vitp.retrieval.extract.store import partial_directory, skipped_report_path  # noqa: F401
