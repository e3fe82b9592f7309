"""The named choices the library accepts and the command line offers, defined once.

Nothing heavy is imported here: the command line builds its ``choices=`` from these before it knows
whether torch or FAISS will be needed.
"""

# Floating-point precisions by their short name -> the torch dtype's attribute name.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# How a ViT's token features become one vector per image: the mean of the patch tokens, or the CLS token.
POOLS = ("mean", "cls")
# The element type the embedding store keeps vectors in.
STORE_DTYPES = ("float32", "float16")
# Where FAISS builds and searches: auto = every visible GPU when this FAISS build has GPU support.
FAISS_DEVICES = ("auto", "cpu", "gpu")
# The vector engines behind a retrieval index.
BACKENDS = ("faiss", "milvus")


def torch_dtype(precision: str):
    """The torch dtype of a precision's short name (``"bf16"`` -> ``torch.bfloat16``)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[precision])
