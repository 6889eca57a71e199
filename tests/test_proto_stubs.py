"""The committed client stubs are what proto/ generates, and they import without torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "client" / "macefield_client" / "proto"

# lines that only record which grpcio-tools / protobuf release generated the file
_VERSION_LINES = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
]


def _normalise(text: str) -> str:
    for pattern in _VERSION_LINES:
        text = pattern.sub("<generator version>", text)
    return text


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_equal_generated(tmp_path):
    out = tmp_path / "proto"
    subprocess.run([sys.executable, str(REPO / "proto" / "generate_stubs.py"), "--out", str(out)], check=True,
                   capture_output=True)
    generated, committed = _tree(out), _tree(COMMITTED)
    assert sorted(generated) == sorted(committed), "stub files differ: run `python proto/generate_stubs.py`"
    for name in generated:
        assert _normalise(generated[name]) == _normalise(committed[name]), (
            f"{name} is stale: run `python proto/generate_stubs.py` and commit the result"
        )
    # the descriptor itself must match byte for byte, whatever the generator version
    pb2 = "macefield/v1/macefield_pb2.py"
    serialized = re.compile(r"AddSerializedFile\((b'.*?')\)", re.S)
    assert serialized.search(generated[pb2]).group(1) == serialized.search(committed[pb2]).group(1)


def test_stubs_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from macefield_client.proto.macefield.v1 import macefield_pb2 as pb, macefield_pb2_grpc as rpc\n"
        "r = pb.PredictRequest(atomic_numbers=[8], positions=[0, 0, 0], outputs=['energy'])\n"
        "assert pb.PredictRequest.FromString(r.SerializeToString()) == r\n"
        "assert hasattr(rpc, 'MaceFieldStub') and hasattr(rpc, 'add_MaceFieldServicer_to_server')\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
