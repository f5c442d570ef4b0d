"""ekd teacher side, one package per concept: core (shared by both sides), teachers (zoo and engine), formats
(tensor codec, soft-label forms), cache (key layout, stores, guard), rpc (the gRPC service and its client) and
serve (the Ray Serve adapter).

Everything is plain PyTorch but `services.serve.deployments`, the only module that imports Ray.
"""
