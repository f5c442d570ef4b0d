"""Python code generated from proto/ekd/v1/teacher.proto; regenerate with `python scripts/generate_proto.py`.

    from services._generated import teacher_pb2, teacher_pb2_grpc, TEACHER_SERVICE_FULL_NAME
"""

from services._generated import teacher_pb2, teacher_pb2_grpc

# "ekd.v1.TeacherService": the name the health service and server reflection register the service under.
TEACHER_SERVICE_FULL_NAME: str = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name

__all__ = ["TEACHER_SERVICE_FULL_NAME", "teacher_pb2", "teacher_pb2_grpc"]
