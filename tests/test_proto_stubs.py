"""The committed gRPC stubs: up to date with proto/, and wire-compatible with stock tritonclient."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.internal import api_implementation

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "guard" / "server" / "_proto"
GEN_SCRIPT = ROOT / "tools" / "gen_proto.py"
REGEN_HINT = (
    "regenerate with `python tools/gen_proto.py` (grpcio-tools=={tools}) and commit guard/server/_proto"
)

OIP_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


def _load_gen_module():
    spec = importlib.util.spec_from_file_location("_gen_proto", GEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, owned) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and owned(p.relative_to(root).as_posix())
    }


def _committed_grpc_tools_version() -> str:
    text = (STUBS / "inference" / "grpc_service_pb2_grpc.py").read_text()
    return re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, flags=re.MULTILINE).group(1)


# --------------------------------------------------------------------------------------------------------------
# (a) committed stubs == fresh generation


def test_committed_stubs_match_fresh_generation(tmp_path):
    tools_version = importlib.metadata.version("grpcio-tools")
    committed_version = _committed_grpc_tools_version()
    if tools_version != committed_version:
        pytest.skip(
            f"stubs were generated with grpcio-tools {committed_version}, {tools_version} is installed: "
            "byte comparison skipped (the descriptor comparison below still runs)"
        )
    hint = REGEN_HINT.format(tools=tools_version)
    out = tmp_path / "_proto"
    proc = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"tools/gen_proto.py failed:\n{proc.stdout}\n{proc.stderr}"

    owned = _load_gen_module().is_generated
    fresh, committed = _tree(out, owned), _tree(STUBS, owned)
    assert fresh, "tools/gen_proto.py produced nothing"
    missing = sorted(fresh.keys() - committed.keys())
    stale = sorted(committed.keys() - fresh.keys())
    differ = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    assert not (missing or stale or differ), (
        f"guard/server/_proto is out of date with proto/ (missing: {missing}, stale: {stale}, "
        f"differ: {differ}); {hint}"
    )


def test_gen_proto_refuses_a_folder_it_did_not_make(tmp_path):
    """`--out` one level too high would have removed every __init__.py and *_pb2.py below it as stale stubs."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (package / "model_pb2.py").write_text("# someone else's\n")
    proc = subprocess.run([sys.executable, str(GEN_SCRIPT), "--out", str(package)], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode != 0 and "not a stubs folder made here" in proc.stderr
    assert (package / "sub" / "__init__.py").read_text() == "VALUE = 1\n" and (package / "model_pb2.py").exists()
    assert sorted(p.name for p in package.rglob("*")) == ["__init__.py", "model_pb2.py", "sub"]


def _clear_json_names(messages) -> None:
    for msg in messages:
        for field in msg.field:
            field.ClearField("json_name")
        _clear_json_names(msg.nested_type)


def test_committed_descriptors_match_proto_sources(tmp_path):
    """Version-independent: the descriptors embedded in the stubs are what protoc makes of proto/ today."""
    gen = _load_gen_module()
    protos = gen.find_protos(gen.PROTO_DIR)
    descriptor_set = tmp_path / "set.pb"
    proc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={descriptor_set}", *protos],
        cwd=gen.PROTO_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    fresh = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file}
    for file in fresh.values():  # protoc's Python generator drops the derived json_name; do the same
        _clear_json_names(file.message_type)

    from guard.server._proto.guard.v1 import guard_pb2
    from guard.server._proto.inference import grpc_service_pb2

    committed = {m.DESCRIPTOR.name: m.DESCRIPTOR for m in (grpc_service_pb2, guard_pb2)}
    assert sorted(committed) == sorted(fresh), "a .proto was added or removed; " + REGEN_HINT.format(
        tools=importlib.metadata.version("grpcio-tools")
    )
    for name, desc in committed.items():
        assert descriptor_pb2.FileDescriptorProto.FromString(desc.serialized_pb) == fresh[name], (
            f"{name} changed since the stubs were generated; "
            + REGEN_HINT.format(tools=importlib.metadata.version("grpcio-tools"))
        )


# --------------------------------------------------------------------------------------------------------------
# (b) wire compatibility with tritonclient


def _message_closure(service, rpcs) -> dict[str, object]:
    """Full name -> Descriptor of every message reachable from the given rpcs (nested and map entries too)."""
    seen: dict[str, object] = {}
    todo = [t for m in service.methods if m.name in rpcs for t in (m.input_type, m.output_type)]
    while todo:
        msg = todo.pop()
        if msg.full_name in seen:
            continue
        seen[msg.full_name] = msg
        todo.extend(msg.nested_types)
        todo.extend(f.message_type for f in msg.fields if f.message_type is not None)
    return seen


def _field_table(msg) -> list[tuple]:
    proto = descriptor_pb2.DescriptorProto()
    msg.CopyToProto(proto)
    oneofs = [o.name for o in proto.oneof_decl]
    return sorted(
        (
            f.number,
            f.name,
            descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
        )
        for f in proto.field
    )


@pytest.fixture(scope="module")
def oip():
    from guard.server._proto.inference import grpc_service_pb2

    return grpc_service_pb2


def _import_tritonclient(module: str):
    # Importing tritonclient next to the stubs works only because the stubs use a private descriptor pool
    # (see tools/gen_proto.py), and only with the upb/cpp protobuf backends: the pure-Python one also
    # registers every message class in the default pool, where tritonclient defines the same names.
    if api_implementation.Type() == "python":
        pytest.skip("pure-Python protobuf: the stubs and tritonclient cannot share one process")
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def triton_pb2():
    return _import_tritonclient("tritonclient.grpc.service_pb2")


def test_oip_package_and_service_match_tritonclient(oip, triton_pb2):
    ours = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert oip.DESCRIPTOR.package == triton_pb2.DESCRIPTOR.package == "inference"
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in ours.methods] == list(OIP_RPCS)
    for name in OIP_RPCS:
        a, b = ours.methods_by_name[name], theirs.methods_by_name[name]
        assert (a.input_type.full_name, a.output_type.full_name) == (
            b.input_type.full_name,
            b.output_type.full_name,
        ), name
        assert not (a.client_streaming or a.server_streaming or b.client_streaming or b.server_streaming), (
            name
        )


def test_oip_messages_match_tritonclient(oip, triton_pb2):
    ours = _message_closure(oip.DESCRIPTOR.services_by_name["GRPCInferenceService"], OIP_RPCS)
    theirs = _message_closure(triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"], OIP_RPCS)
    assert sorted(ours) == sorted(theirs)
    # Sanity: the closure really covers the shared value types.
    assert {"inference.InferParameter", "inference.InferTensorContents"} <= ours.keys()
    for name in sorted(ours):
        assert _field_table(ours[name]) == _field_table(theirs[name]), name
        assert [o.name for o in ours[name].oneofs] == [o.name for o in theirs[name].oneofs], name
        assert ours[name].GetOptions().map_entry == theirs[name].GetOptions().map_entry, name


def test_oip_payload_round_trips_through_tritonclient_messages(oip, triton_pb2):
    ours = oip.ModelInferRequest(model_name="m", model_version="1", id="req-7")
    ours.parameters["sequence_id"].uint64_param = 2**63 + 1
    ours.parameters["flag"].bool_param = True
    tensor = ours.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.parameters["scale"].double_param = 0.5
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    ours.outputs.add(name="y").parameters["classification"].int64_param = 3
    ours.raw_input_contents.append(b"\x00\x01")

    theirs = triton_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.parameters["sequence_id"].uint64_param == 2**63 + 1
    assert theirs.inputs[0].contents.fp32_contents == [1.0, 2.0, 3.0]
    assert oip.ModelInferRequest.FromString(theirs.SerializeToString()) == ours


# --------------------------------------------------------------------------------------------------------------
# (c) a real server built from the stubs answers a stock tritonclient


@pytest.fixture()
def oip_server(oip):
    from guard.server._proto.inference import grpc_service_pb2_grpc

    class Servicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return oip.ServerLiveResponse(live=True)

        def ModelInfer(self, request, context):
            # Echo: every input comes back as an output of the same name, doubled.
            response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
            for tensor, raw in zip(request.inputs, request.raw_input_contents):
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
                response.raw_output_contents.append(
                    (np.frombuffer(raw, dtype="<f4") * 2).astype("<f4").tobytes()
                )
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_tritonclient_talks_to_generated_server(oip_server):
    tritongrpc = _import_tritonclient("tritonclient.grpc")
    client = tritongrpc.InferenceServerClient(oip_server)
    try:
        assert client.is_server_live() is True

        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = tritongrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("echo", [inp], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("x"), x * 2)
        assert result.get_response().id == "r1"

        # Unimplemented rpcs surface as a clean UNIMPLEMENTED error, not a wire-format failure.
        with pytest.raises(tritongrpc.InferenceServerException, match="UNIMPLEMENTED"):
            client.is_server_ready()
    finally:
        client.close()
