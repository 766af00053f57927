"""SSML for spoken replies.

The Telephony channel needs whitespace between every tag and text element, and the
speech service rejects SSML that is not well-formed XML, so caller text is escaped
and stripped of characters XML 1.0 forbids before it goes anywhere near a tag.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape, quoteattr

SSML_NAMESPACE = "http://www.w3.org/2001/10/synthesis"

# Characters outside XML 1.0's Char production: C0 controls but tab/LF/CR, lone
# surrogates, and U+FFFE/U+FFFF.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# A parser turns a literal CR (alone or before LF) into LF; as a character reference it
# stays a CR, so the text parsed back is the text given.
_ENTITIES = {'"': "&quot;", "'": "&apos;", "\r": "&#13;"}


def xml_text(text: str) -> str:
    """Text safe to place between XML tags; a parser reads back exactly ``clean_text(text)``."""
    return escape(_NOT_XML_CHAR.sub("", text), _ENTITIES)


def clean_text(text: str) -> str:
    """Plain text with characters XML forbids removed (what the caller hears is the same)."""
    return _NOT_XML_CHAR.sub("", text)


def speak(text_xml: str, voice: str, locale: str) -> str:
    """Wrap already-escaped text in ``<speak><voice>``, whitespace between every element."""
    head, tail = speak_parts(voice, locale)
    return head + text_xml + tail


def speak_parts(voice: str, locale: str) -> tuple[str, str]:
    """What ``speak`` puts before and after the text, to build once per prompt."""
    return (
        f'<speak version="1.0" xmlns="{SSML_NAMESPACE}" xml:lang={quoteattr(locale)}> '
        f"<voice name={quoteattr(voice)}> ",
        " </voice> </speak>",
    )
