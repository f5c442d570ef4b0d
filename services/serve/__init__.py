"""The Ray Serve adapter: one deployment per teacher with dynamic batching, the gRPC ingress, the serve
config."""
