"""The inference service: the Open Inference Protocol (KServe v2) over FastAPI, with dynamic batching.

protocol.py speaks the wire format, model.py and repository.py hold the models, batching.py queues
requests, metrics.py counts, app.py ties them to HTTP routes, and bench.py is the load generator.
"""
