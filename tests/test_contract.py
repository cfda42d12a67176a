"""Contract v1 as generated clients see it: frozen, signed, snake_case JSON throughout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import descriptor, json_format

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
PROTO = Path("protos/canvas_gateway/v1/canvas_gateway.proto")
BRAZE_UPPERCASE = {"canvas_gateway.v1.Audience.all_of": "AND", "canvas_gateway.v1.Audience.any_of": "OR"}
UNSIGNED = {descriptor.FieldDescriptor.TYPE_UINT32, descriptor.FieldDescriptor.TYPE_UINT64}


def _fields() -> list[descriptor.FieldDescriptor]:
    return [field for message in pb.DESCRIPTOR.message_types_by_name.values() for field in message.fields]


def test_every_field_has_a_snake_case_json_name_and_a_signed_type() -> None:
    fields = _fields()
    assert len(fields) > 60
    for field in fields:
        assert field.json_name == BRAZE_UPPERCASE.get(field.full_name, field.name), field.full_name
        assert field.type not in UNSIGNED, field.full_name


def test_responses_print_braze_s_and_the_gateway_s_words_in_snake_case() -> None:
    result = pb.BatchResult(batch_index=2, positions=[100], code=3, braze=pb.BrazeReply(dispatch_id="d"))
    printed = json_format.MessageToDict(result)
    assert printed == {
        "batch_index": "2",
        "positions": ["100"],
        "code": "INVALID_ARGUMENT",
        "braze": {"dispatch_id": "d"},
    }


def test_a_json_recipient_naming_two_identifiers_is_refused() -> None:
    with pytest.raises(json_format.ParseError, match="oneof"):
        json_format.Parse('{"external_user_id": "u", "email": "u@example.com"}', pb.Recipient())


def _breaking(tmp_path: Path, edit: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    """`buf breaking` against the frozen image, of a copy of protos/ with one edit."""
    tmp_path.mkdir()
    for name in ("buf.yaml", "protos"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    proto = tmp_path / PROTO
    text = proto.read_text()
    assert edit[0] in text
    proto.write_text(text.replace(edit[0], edit[1]))
    against = str(ROOT / "protos/FROZEN.binpb")
    return subprocess.run(
        [str(BUF), "breaking", "--against", against], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (("string dispatch_id = 2", "string receipt_id = 2"), "changed name"),
        (("int64 batch_index = 1", "uint64 batch_index = 1"), "changed type"),
        (("  OUTCOME_CANVAS_INACTIVE = 5;\n", ""), "deleted"),
    ],
)
def test_the_frozen_contract_refuses_a_breaking_change(
    tmp_path: Path, edit: tuple[str, str], complaint: str
) -> None:
    refused = _breaking(tmp_path / "edited", edit)
    assert refused.returncode != 0
    assert complaint in refused.stdout + refused.stderr


def test_the_frozen_contract_takes_an_added_field(tmp_path: Path) -> None:
    added = ("  string request_id = 7", "  string idempotency_key = 9;\n  string request_id = 7")
    kept = _breaking(tmp_path / "added", added)
    assert kept.returncode == 0, kept.stdout + kept.stderr
