"""Generate the committed Python stubs from proto/ (one script, portable, no shell tools).

Usage: python tools/gen_protos.py [OUT_DIR]   (default: clients/)
The drift test runs it into a temporary folder and compares the files byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
#: Protos whose package is public (`inference`, also registered by tritonclient) get a descriptor
#: pool of their own, so that one process can import both without a duplicate-symbol error.
PRIVATE_POOL = ("xaid/oip/",)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) for every .proto and return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for source in sources:
        if source.startswith(PRIVATE_POOL):
            module = out_dir / source.replace(".proto", "_pb2.py")
            text = module.read_text(encoding="utf-8")
            pool = text.replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")
            module.write_text(pool, encoding="utf-8")
    return generated_files(out_dir)


def generated_files(out_dir: Path) -> list[Path]:
    files: list[Path] = []
    for proto in proto_files():
        stem = out_dir / proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            files.append(stem.with_name(stem.name + suffix))
    return files


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients"
    for path in generate(target):
        print(path.relative_to(target))
