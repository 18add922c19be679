"""Proto compatibility: compare the current protos with the last released API, recorded in ``proto/api.lock.json``.

``python proto/compat.py check``   fails (exit 1) on a breaking change: a removed or renumbered field, a changed
                                   type or cardinality, a removed message, enum value, service or RPC, or a
                                   changed RPC signature. Additions are fine.
``python proto/compat.py release`` records the current protos as the released API (run when cutting a release).

The lock is a readable contract (what clients in every language depend on), compiled from the .proto files with
grpc_tools' protoc; it is reviewed like code. ``buf lint`` (style) runs beside it in ``make proto-check``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOCK = HERE / "api.lock.json"
PACKAGES = ("facegate/v1",)


def describe(proto_root: Path = HERE) -> dict[str, Any]:
    """Messages (fields by number), enums (values by number) and services of the API packages."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(proto_root)) for pkg in PACKAGES for p in (proto_root / pkg).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        import grpc_tools

        include = str(Path(grpc_tools.__file__).parent / "_proto")
        rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", "--include_imports",
                          f"--descriptor_set_out={out}", *files])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc}) on {files}")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    api: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}

    def walk_message(prefix: str, m: Any) -> None:
        name = f"{prefix}.{m.name}"
        type_name = descriptor_pb2.FieldDescriptorProto.Type.Name
        api["messages"][name] = {
            str(f.number): {"name": f.name, "type": f.type_name or type_name(f.type),
                            "label": descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
                            "oneof": m.oneof_decl[f.oneof_index].name
                            if f.HasField("oneof_index") and not f.proto3_optional else ""}
            for f in m.field}
        api["messages"][name + "#reserved"] = sorted({n for r in m.reserved_range for n in range(r.start, r.end)})
        for nested in m.nested_type:
            if not nested.options.map_entry:
                walk_message(name, nested)
        for e in m.enum_type:
            api["enums"][f"{name}.{e.name}"] = {str(v.number): v.name for v in e.value}

    for f in fds.file:
        if not any(f.name.startswith(p + "/") for p in PACKAGES):
            continue
        for m in f.message_type:
            walk_message(f.package, m)
        for e in f.enum_type:
            api["enums"][f"{f.package}.{e.name}"] = {str(v.number): v.name for v in e.value}
        for s in f.service:
            api["services"][f"{f.package}.{s.name}"] = {
                rpc.name: {"input": rpc.input_type, "output": rpc.output_type,
                           "client_streaming": rpc.client_streaming, "server_streaming": rpc.server_streaming}
                for rpc in s.method}
    return api


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    problems = []
    for name, fields in old["messages"].items():
        if name.endswith("#reserved"):
            continue
        if name not in new["messages"]:
            problems.append(f"message {name} was removed")
            continue
        now = new["messages"][name]
        reserved = set(new["messages"].get(name + "#reserved", []))
        for number, f in fields.items():
            cur = now.get(number)
            if cur is None:
                if int(number) not in reserved:
                    problems.append(f"{name}: field {number} ({f['name']}) was removed without reserving its number")
                continue
            for key in ("name", "type", "label", "oneof"):
                if cur[key] != f[key]:
                    problems.append(f"{name}: field {number} changed {key} from {f[key]!r} to {cur[key]!r}")
        by_name = {f["name"]: n for n, f in now.items()}
        for number, f in fields.items():
            moved = by_name.get(f["name"])
            if moved is not None and moved != number:
                problems.append(f"{name}: field {f['name']} moved from number {number} to {moved}")
    for name, values in old["enums"].items():
        now = new["enums"].get(name)
        if now is None:
            problems.append(f"enum {name} was removed")
            continue
        for number, v in values.items():
            if now.get(number) != v:
                problems.append(f"enum {name}: value {number} ({v}) was removed or renamed")
    for name, rpcs in old["services"].items():
        now = new["services"].get(name)
        if now is None:
            problems.append(f"service {name} was removed")
            continue
        for rpc, sig in rpcs.items():
            if rpc not in now:
                problems.append(f"{name}.{rpc} was removed")
            elif now[rpc] != sig:
                problems.append(f"{name}.{rpc} changed its signature")
    return sorted(set(problems))


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "check"
    root = Path(argv[1]) if len(argv) > 1 else HERE
    current = describe(root)
    if cmd == "release":
        LOCK.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(current['messages'])} messages, {len(current['services'])} services in {LOCK}")
        return 0
    problems = breaking_changes(json.loads(LOCK.read_text()), current)
    for p in problems:
        print(f"BREAKING: {p}")
    print("proto compatibility: " + ("FAILED" if problems else "ok (no breaking change against the released API)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
