"""Teachers: what a teacher is (`spec`), the zoo that builds them by name (`zoo`), their checkpoints
(`checkpoints`), the registered architectures (`architectures`, registered on import of this package) and the
batched engine (`engine`)."""

from services.teachers import architectures as architectures
