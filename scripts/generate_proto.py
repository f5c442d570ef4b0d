"""Regenerate the committed gRPC Python code in services/_generated/ from proto/ekd/v1/teacher.proto.

    python scripts/generate_proto.py [--output-dir DIR]     (default: services/_generated)

protoc names the message module in the service module by its proto package path
(`from ekd.v1 import teacher_pb2`), which only resolves with proto/'s layout on sys.path; the script
rewrites it to a relative import so the files import as `services._generated` from anywhere.

tests/unit/test_proto.py regenerates into a temporary directory and compares with the committed files, less
the generators' version stamps (`without_version_stamps`): a patch release of grpcio-tools changes only those,
and the committed stamps are the oldest runtime the code accepts (grpcio and protobuf check them at import),
so they stay at pyproject.toml's floor while any change of the proto still shows.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "ekd/v1/teacher.proto"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "services" / "_generated"
GENERATED_FILES = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")

PACKAGE_IMPORT = b"from ekd.v1 import teacher_pb2 as "
RELATIVE_IMPORT = b"from . import teacher_pb2 as "

# The version stamps protoc and grpcio-tools write: protobuf's comment and its runtime check's major, minor
# and patch arguments in teacher_pb2.py, GRPC_GENERATED_VERSION in teacher_pb2_grpc.py.
_VERSION_STAMPS = (
    re.compile(rb"^(# Protobuf Python Version: ).*$", re.MULTILINE),
    re.compile(rb"^(GRPC_GENERATED_VERSION = ).*$", re.MULTILINE),
    re.compile(
        rb"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"
    ),
)


def run_protoc(output_dir: Path) -> None:
    """Write protoc's Python, stub and gRPC output for PROTO_FILE under output_dir (package layout)."""
    well_known_protos = importlib.resources.files("grpc_tools") / "_proto"
    exit_code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known_protos}",
            f"--python_out={output_dir}",
            f"--pyi_out={output_dir}",
            f"--grpc_python_out={output_dir}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
    )
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code} on {PROTO_ROOT / PROTO_FILE}")


def make_imports_relative(source: bytes, file_name: str) -> bytes:
    """Replace protoc's package-path import of teacher_pb2 with a relative one (if the file has it)."""
    occurrences = source.count(PACKAGE_IMPORT)
    if file_name == "teacher_pb2_grpc.py" and occurrences != 1:
        raise RuntimeError(
            f"expected exactly one {PACKAGE_IMPORT.decode()!r} in {file_name}, found {occurrences}; "
            "grpcio-tools changed its output format, update scripts/generate_proto.py"
        )
    return source.replace(PACKAGE_IMPORT, RELATIVE_IMPORT)


def without_version_stamps(source: bytes) -> bytes:
    """`source` with the generators' version stamps blanked, for comparing code made by two patch releases."""
    for stamp in _VERSION_STAMPS:
        source = stamp.sub(rb"\1<version>", source)
    return source


def generate(output_dir: Path) -> list[Path]:
    """Generate GENERATED_FILES flat into output_dir (created if missing); returns the written paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as protoc_output:
        run_protoc(Path(protoc_output))
        package_dir = Path(protoc_output) / Path(PROTO_FILE).parent
        for file_name in GENERATED_FILES:
            source = (package_dir / file_name).read_bytes()
            target = output_dir / file_name
            target.write_bytes(make_imports_relative(source, file_name))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help=f"directory to write {', '.join(GENERATED_FILES)} into (default: {DEFAULT_OUTPUT_DIR})",
    )
    args = parser.parse_args(argv)
    for path in generate(args.output_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
