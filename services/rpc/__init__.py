"""The gRPC TeacherService: request parsing, the servicer, the server, its client, transport security,
health checks and metrics."""
