"""`vitp serve`: a web page and JSON API over a saved retrieval index and the ViT that embedded it.

* :mod:`vitp.serve.engine`  the search itself: uploads and gallery images embedded exactly like the
  gallery, top-K (optionally within one class), thumbnails of gallery images only;
* :mod:`vitp.serve.app`     the FastAPI application (``/``, ``/api/...``, OpenAPI docs at ``/docs``);
* :mod:`vitp.serve.server`  loading everything and running it under uvicorn;
* ``static/``               the page: plain HTML, CSS and JavaScript, nothing fetched from elsewhere.
"""
