"""ekd teacher side: model zoo, batched engine, tensor codec, output cache, gRPC service and client.

The core modules are plain PyTorch; Ray appears only in `services.deployments`.
"""
