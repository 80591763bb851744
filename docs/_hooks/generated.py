"""MkDocs hook: the parts of the documentation that are generated from the code.

A page holds a marker line; the build replaces it with Markdown made from the package, so
these parts cannot drift from the code. The settings and events references are also
committed in their pages, between the marker and :data:`END`, for readers of docs/*.md on
GitHub or in a clone: ``python docs/_hooks/generated.py`` rewrites those copies, the build
replaces them with fresh ones, and ``tests/test_docs.py`` fails when one is not current.

* ``<!-- generated: settings-table -->``: every setting of ``Settings`` (the settings page's table,
  from :func:`layercode_asgi.config.settings_table_markdown`);
* ``<!-- generated: benchmark-results -->``: ``benchmarks/RESULTS.md`` as the harness last
  wrote it, its headings one level down;
* ``<!-- generated: events-reference -->``: every webhook event, field by field (name,
  type, required or optional, default, meaning) and a complete example, read from the
  msgspec structs of the :data:`layercode_asgi.WebhookPayload` union with
  :func:`msgspec.inspect.type_info`. Each example is decoded with
  :func:`layercode_asgi.parse_webhook_payload` while the page is built.

``tests/test_docs.py`` checks the same functions: that every field is described and every
example decodes to the struct it documents. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec

MARKERS = {
    "<!-- generated: settings-table -->": "settings_table",
    "<!-- generated: events-reference -->": "events_reference",
    "<!-- generated: benchmark-results -->": "benchmark_results",
}

#: What each field means, by name (the same field means the same in every event).
FIELD_DOCS: dict[str, str] = {
    "session_id": "Id of the voice session; changes when the client reconnects.",
    "conversation_id": "Id of the conversation; stable across reconnects. History and the "
    "per-conversation lock are keyed by it (at most 512 characters).",
    "turn_id": "Id of this turn; every event of the reply must carry it.",
    "text": "The user's transcribed speech (`message`); on `session.start`, text LayerCode "
    "may pass along. `null` when nothing was transcribed.",
    "metadata": "Free-form JSON object attached to the session (whatever the client sent).",
    "custom_metadata": "Free-form JSON object of custom data attached to the session.",
    "from_phone_number": "Caller's number, for phone sessions.",
    "to_phone_number": "Number called, for phone sessions.",
    "recording_url": "Where to download the session's recording (WAV).",
    "recording_status": "State of the recording: `completed` or `failed` "
    "(`session.update`), `enabled` or `disabled` (`session.end`).",
    "recording_duration": "Length of the recording, in seconds.",
    "error_message": "Why the recording failed.",
    "transcript": "The conversation so far, oldest first: a list of transcript items "
    "(`role`, `text`, optional `timestamp`; other item fields are kept in `extra`), or a "
    "string on `message`.",
    "usage": "Usage figures LayerCode may attach, as a JSON object.",
    "data": "Any JSON value the client sent with `client.response.data`; `{}` when absent.",
    "agent_id": "Id of the LayerCode agent.",
    "started_at": "When the session started (ISO-8601 string).",
    "ended_at": "When the session ended (ISO-8601 string).",
    "duration": "Length of the session, in milliseconds.",
    "transcription_duration_seconds": "Speech-to-text time, in seconds.",
    "tts_duration_seconds": "Text-to-speech time, in seconds.",
    "latency": "Latency figure reported by LayerCode, in seconds.",
    "ip_address": "The client's IP address.",
    "country_code": "The client's country code.",
}

#: What each field of a transcript item means.
ITEM_DOCS: dict[str, str] = {
    "role": "Who spoke: `user` or `assistant` (kept as any string).",
    "text": "What was said.",
    "timestamp": "When: unix milliseconds (a number) or an ISO-8601 string, kept as received.",
    "extra": "The item's other fields, those this version does not know, by name; `null` "
    "when there are none. Not a wire field: filled by the decoder.",
}

#: Example values, by field name, for the complete example of each event.
EXAMPLE_VALUES: dict[str, Any] = {
    "session_id": "sess_5f2a",
    "conversation_id": "conv_81c4",
    "turn_id": "turn_0007",
    "text": "What time do you open tomorrow?",
    "metadata": {"user_id": "u_42"},
    "custom_metadata": {"plan": "pro"},
    "from_phone_number": "+14155550100",
    "to_phone_number": "+14155550199",
    "recording_url": "https://recordings.example/sess_5f2a.wav",
    "recording_duration": 42.5,
    "error_message": None,
    "usage": {"stt_seconds": 1.2},
    "data": {"clicked": "book-table"},
    "agent_id": "ag_9d1e",
    "started_at": "2026-12-01T10:00:00Z",
    "ended_at": "2026-12-01T10:03:12Z",
    "duration": 192000,
    "transcription_duration_seconds": 14.2,
    "tts_duration_seconds": 21.7,
    "latency": 0.62,
    "ip_address": "203.0.113.7",
    "country_code": "US",
}

#: Per event, values that differ from :data:`EXAMPLE_VALUES`.
EXAMPLE_OVERRIDES: dict[str, dict[str, Any]] = {
    "session.start": {"text": None},
    "session.update": {"recording_status": "completed"},
    "session.end": {
        "recording_status": "enabled",
        "transcript": [
            {"role": "assistant", "text": "Hi! How can I help?", "timestamp": 1764583200000},
            {"role": "user", "text": "What time do you open tomorrow?"},
        ],
    },
    "message": {
        "recording_status": "completed",
        "transcript": [{"role": "user", "text": "What time do you open tomorrow?"}],
    },
}


#: Ends the committed copy of a generated part (the pages that keep one: :data:`COMMITTED`).
END = "<!-- end of the generated part -->"
#: The pages holding a committed copy of their generated part, by marker.
COMMITTED = {
    "<!-- generated: settings-table -->": "settings.md",
    "<!-- generated: events-reference -->": "events.md",
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker line (and the committed copy after it, if any) with its
    generated Markdown."""
    for marker, name in MARKERS.items():
        if marker in markdown:
            before, _, after = markdown.partition(marker)
            if marker in COMMITTED:
                after = after.partition(END)[2]
            markdown = before + GENERATORS[name]() + after
    return markdown


def write_committed_copies() -> None:
    """Rewrite the committed copy of each generated part in its page."""
    for marker, page in COMMITTED.items():
        path = Path(__file__).resolve().parents[1] / page
        before, _, after = path.read_text().partition(marker)
        fresh = f"{marker}\n{GENERATORS[MARKERS[marker]]()}\n{END}"
        path.write_text(before + fresh + after.partition(END)[2])


def settings_table() -> str:
    from layercode_asgi.config import settings_table_markdown

    return settings_table_markdown()


def event_structs() -> list[msgspec.inspect.StructType]:
    """The struct of every webhook event, in the order of the union."""
    from layercode_asgi import WebhookPayload

    info = msgspec.inspect.type_info(WebhookPayload)
    if isinstance(info, msgspec.inspect.StructType):
        return [info]
    assert isinstance(info, msgspec.inspect.UnionType), info
    return [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]


def type_name(info: msgspec.inspect.Type) -> str:
    """A field's type as a reader would write it (`str | null`, `list[TranscriptItem]`)."""
    mi = msgspec.inspect
    if isinstance(info, mi.UnionType):
        return " \\| ".join(type_name(t) for t in info.types)
    if isinstance(info, mi.StrType):
        return "str"
    if isinstance(info, mi.IntType):
        return "int"
    if isinstance(info, mi.FloatType):
        return "float"
    if isinstance(info, mi.BoolType):
        return "bool"
    if isinstance(info, mi.NoneType):
        return "null"
    if isinstance(info, mi.AnyType):
        return "any JSON"
    if isinstance(info, mi.DictType):
        return f"object of {type_name(info.value_type)}"
    if isinstance(info, mi.ListType):
        return f"list[{type_name(info.item_type)}]"
    if isinstance(info, mi.StructType):
        return info.cls.__name__
    return type(info).__name__.removesuffix("Type").lower()


def _default(field: msgspec.inspect.Field) -> str:
    if field.required:
        return "required"
    if field.default_factory is not msgspec.NODEFAULT:
        return f"optional, default `{json.dumps(field.default_factory())}`"
    return f"optional, default `{json.dumps(field.default)}`"


def example(struct: msgspec.inspect.StructType) -> dict[str, Any]:
    """A complete example body of one event: its ``type`` and every field."""
    tag = struct.tag
    values = {**EXAMPLE_VALUES, **EXAMPLE_OVERRIDES.get(str(tag), {})}
    body: dict[str, Any] = {struct.tag_field or "type": tag}
    for field in struct.fields:
        body[field.encode_name] = values[field.name]
    return body


def events_reference() -> str:
    """The field-by-field reference of every event, with a checked example each."""
    from layercode_asgi import parse_webhook_payload

    parts: list[str] = []
    for struct in event_structs():
        name = struct.cls.__name__
        summary = (struct.cls.__doc__ or "").strip().split("\n\n")[0]
        parts.append(f"## `{struct.tag}`\n")
        parts.append(f"Decoded as `{name}`. {_plain(summary)}\n")
        parts.append("| field | type | required | meaning |")
        parts.append("|---|---|---|---|")
        parts.append(f'| `type` | `"{struct.tag}"` | required | The event type. |')
        for field in struct.fields:
            cells = (
                f"`{field.encode_name}`",
                type_name(field.type),
                _default(field),
                FIELD_DOCS[field.name],
            )
            parts.append("| " + " | ".join(cells) + " |")
        body = example(struct)
        decoded = parse_webhook_payload(json.dumps(body))
        if type(decoded) is not struct.cls:
            raise ValueError(f"the {struct.tag} example decodes to {type(decoded).__name__}")
        parts.append(
            f"\nA complete `{struct.tag}` body (every field; only the required ones "
            "must be present):\n"
        )
        parts.append("```json\n" + json.dumps(body, indent=2) + "\n```\n")
    parts.append(transcript_items())
    return "\n".join(parts)


def transcript_items() -> str:
    """The fields of a transcript item (``session.end``'s and ``message``'s ``transcript``)."""
    from layercode_asgi import TranscriptItem

    info = msgspec.inspect.type_info(TranscriptItem)
    assert isinstance(info, msgspec.inspect.StructType), info
    rows = [
        "## Transcript items\n",
        "Each item of a `transcript` list is decoded as `TranscriptItem`.\n",
        "| field | type | required | meaning |",
        "|---|---|---|---|",
    ]
    for field in info.fields:
        cells = (f"`{field.encode_name}`", type_name(field.type), _default(field))
        rows.append("| " + " | ".join((*cells, ITEM_DOCS[field.name])) + " |")
    return "\n".join(rows) + "\n"


def _plain(docstring_text: str) -> str:
    """reST-style ````code```` to Markdown code, on one line."""
    return " ".join(docstring_text.replace("``", "`").split())


def benchmark_results() -> str:
    """``benchmarks/RESULTS.md`` without its title, every heading one level down."""
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"
    lines: list[str] = []
    fenced = False
    for line in results.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            if line.startswith("# "):
                continue  # the title: the page has its own
            line = "#" + line
        lines.append(line)
    return "\n".join(lines) + "\n"


GENERATORS = {
    "settings_table": settings_table,
    "events_reference": events_reference,
    "benchmark_results": benchmark_results,
}


if __name__ == "__main__":
    write_committed_copies()
