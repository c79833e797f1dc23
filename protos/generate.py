"""Regenerate the committed gRPC stubs from archipelago.proto (`make protos`).

The stubs are committed so the package installs without grpcio-tools; a test regenerates them
into a temporary folder and fails if the committed ones are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "archipelago.proto"


def generate(out_dir: Path) -> list[Path]:
    """Write archipelago_pb2.py, archipelago_pb2.pyi and archipelago_pb2_grpc.py into out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
                        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(HERE / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    grpc_file = out_dir / "archipelago_pb2_grpc.py"
    # protoc writes a top-level import; make it package-relative so `protos` is importable anywhere.
    text = grpc_file.read_text().replace("import archipelago_pb2 as", "from protos import archipelago_pb2 as")
    grpc_file.write_text(text)
    return [out_dir / n for n in ("archipelago_pb2.py", "archipelago_pb2.pyi", "archipelago_pb2_grpc.py")]


def main() -> int:
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
