"""A message frame is written without building its model per message (hub.render_frame);
its text must be exactly what the model (MessageFrame, which the AsyncAPI document is
generated from) writes, for any body, content type and names."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from app.gateway.frames import MessageFrame
from app.gateway.hub import HistoryEntry, render_frame

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def by_model(entry: HistoryEntry) -> str:
    offset, _, peer_id, epoch, sender, content_type, body, _ = entry
    fields: dict[str, object] = {
        "type": "message",
        "offset": offset,
        "epoch": epoch,
        "id": f"{epoch}-{offset}",
        "peer": peer_id,
        "from": sender,
        "content_type": content_type,
    }
    try:
        fields["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        fields["body"] = base64.b64encode(body).decode("ascii")
        fields["encoding"] = "base64"
    return MessageFrame.model_validate(fields).text()


@given(
    st.integers(1, 2**63 - 1),
    texts,
    texts,
    texts,
    st.one_of(st.none(), texts),
    st.one_of(st.binary(max_size=60), texts.map(str.encode)),
)
def test_render_frame_writes_what_the_model_writes(
    offset: int, peer_id: str, epoch: str, sender: str, content_type: str | None, body: bytes
) -> None:
    entry: HistoryEntry = (offset, 0.0, peer_id, epoch, sender, content_type, body, None)
    assert render_frame(entry) == by_model(entry)


def test_control_characters_quotes_and_non_ascii_are_written_alike() -> None:
    body = 'a"b\\c\n\t\x00\x1f\x7f é 漢 🎉'.encode()
    entry: HistoryEntry = (7, 0.0, "p", "e", "sip:1.2.3.4:5060", 'x/"y"', body, None)
    assert render_frame(entry) == by_model(entry)
