"""Vector engines behind :class:`vitp.retrieval.index.RetrievalIndex`:

* :mod:`~vitp.retrieval.backends.faiss`      FAISS on one machine (GPU when present), built under a memory budget
* :mod:`~vitp.retrieval.backends.autoindex`  autofaiss's rule: which FAISS index fits a budget, tuned to a query time
* :mod:`~vitp.retrieval.backends.milvus`     a Milvus collection: Milvus Lite in a local file, or a cluster
"""
