"""`labs serve`: an OpenAI-compatible HTTP server for a trained model (docs/serving.md).

    target.py   TARGET (run, HF folder, hub id, preset, LoRA adapter) -> what is served; torch-free
    plan.py     the plan `labs serve` prints and the rank spec it writes; torch-free
    rank.py     inside every rank: `python -m launcher.serve.rank --spec F` (rank 0 serves HTTP)
    models.py   the model, tokenizer and adapters on a rank; AutoTP for tensor parallel
    kv.py       one batch's KV cache: rows leave and join between decode steps
    batcher.py  the engine thread: requests -> batch steps (continuous batching)
    sequence.py one request's generation: sampling, stop strings, streamed text
    ranks.py    rank 0 broadcasts each batch step; the other ranks run the same forward
    api.py      request validation and OpenAI-style bodies; http.py: the FastAPI routes
    metrics.py  Prometheus metrics
The launcher side (`labs serve` itself: plan, backend command, supervision) is launcher/serve_cli.py.
"""
