"""The inference service: the Open Inference Protocol (KServe v2) over HTTP (FastAPI) and gRPC, with dynamic batching.

protocol.py speaks the wire format and names the kinds of failure, repository.py reads the models and model.py
serves one, batching.py queues requests, metrics.py counts, core.py is the server whatever the transport (one
call per inference request, with its accounting), app.py (HTTP routes) and grpc_service.py (gRPC) translate their
wire formats to and from it, and server.py starts them. The load generator that measures a server is
yatdeploy/loadgen.py.
"""
