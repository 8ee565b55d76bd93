"""Error messages stay short enough to reach the caller (``mesh.errors``)."""

from __future__ import annotations

from mesh.errors import MAX_MESSAGE_BYTES, InvalidArgument, NotFound, clip_message


def test_a_short_message_is_kept_as_it_is() -> None:
    assert clip_message("no experiment 'x' for tenant 'demo'") == (
        "no experiment 'x' for tenant 'demo'"
    )


def test_a_message_quoting_a_megabyte_is_cut_on_a_character_boundary() -> None:
    error = NotFound(f"no experiment {'é' * (1 << 19)!r} for tenant 'demo'")
    assert len(error.message.encode()) <= MAX_MESSAGE_BYTES
    assert error.message.startswith("no experiment 'éé") and error.message.endswith("...")
    assert str(error) == error.message
    assert error.to_dict()["message"] == error.message


def test_the_field_is_kept_whole() -> None:
    error = InvalidArgument("x" * 5000, field="events[3].attributes")
    assert error.field == "events[3].attributes"
    assert len(error.message.encode()) == MAX_MESSAGE_BYTES
