"""Tensors as bytes: the codec of the gRPC `Tensor` message and of cache values, and the soft-label forms."""
