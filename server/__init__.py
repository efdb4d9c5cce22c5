"""The HTTP process's side of the service (with app.py and batch_processor.py at the top level).

The HTTP contract: protocol.py (requests), responses.py (answers, SSE chunks, the error table),
routes.py (the APIRouter), errors.py (the error handlers). Behind the routes: generation.py (a
request in flight, its stream), completions.py and chat.py (their shapes), state.py (what routes
share), security.py (keys, rate limits), metrics.py (Prometheus)."""
