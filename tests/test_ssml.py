"""SSML rendering: hostile caller text always yields well-formed, whitespace-separated SSML.

The hostile inputs here are a fixed list, one named case per kind; tests/test_fuzz.py
generates them with Hypothesis (10,000 caller strings through ``speak`` and the reply path).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from orchestrator.callflow import CallFlow, load_callflow
from orchestrator.ssml import SSML_NAMESPACE, clean_text, speak, xml_text
from tests.conftest import SAMPLE_FLOW

SPEAK_TAG = f"{{{SSML_NAMESPACE}}}speak"
VOICE_TAG = f"{{{SSML_NAMESPACE}}}voice"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

HOSTILE = {
    "markup-amp-quote": '<b> & "',
    "cdata-end": "]]>",
    "c0-controls": "\x00\x01\x1b",
    "lone-surrogate": "\ud800",
    "noncharacter-fffe": "\ufffe",
    "noncharacter-ffff": "a\uffffb",
    "astral": "\U0001d11e\U0001f389",
    "sql": "' OR 1=1 --",
    "long-5000": ("<&>\"' x" * 715)[:5000],
    "close-tags": "</voice></speak><speak>",
    "entity": "&amp;",
    "char-ref": "&#0; &#x1F; &lt;",
    "comment": "<!-- -->",
    "pi": "<?xml version='1.0'?>",
    "doctype": '<!DOCTYPE x [<!ENTITY e "boom">]>&e;',
    "placeholder": "{input}",
    "tab-newline": "a\tb\nc",
    "carriage-returns": "a\rb\r\nc",  # a parser reads a literal CR as LF
    "empty": "",
    "mixed": "caf\u00e9 \x07bell \ud83d",
}


@pytest.fixture(scope="module")
def flow() -> CallFlow:
    return load_callflow(SAMPLE_FLOW)


def assert_whitespace_between_elements(ssml: str) -> None:
    assert "><" not in ssml
    assert re.search(r">[^\s<]", ssml) is None
    assert re.search(r"[^\s>]<", ssml) is None


def parse_speak(ssml: str) -> tuple[ET.Element, ET.Element]:
    root = ET.fromstring(ssml)
    assert root.tag == SPEAK_TAG
    children = list(root)
    assert len(children) == 1
    voice = children[0]
    assert voice.tag == VOICE_TAG
    assert list(voice) == []  # caller text never becomes markup
    return root, voice


@pytest.mark.parametrize("caller_input", list(HOSTILE.values()), ids=list(HOSTILE))
def test_echo_of_hostile_input_is_well_formed(flow: CallFlow, caller_input: str) -> None:
    spoken = flow.render("echo", {"input": caller_input})
    expected = 'What I heard was "' + clean_text(caller_input) + '"'

    root, voice = parse_speak(spoken.ssml)
    assert root.get(XML_LANG) == "en-US"
    assert voice.get("name") == "en-US-GuyNeural"
    assert voice.text is not None
    assert voice.text.strip() == expected
    assert_whitespace_between_elements(spoken.ssml)

    assert spoken.name == "echo"
    assert spoken.text == expected


def test_clean_text_removes_only_forbidden_characters() -> None:
    assert clean_text("a\x00b\x08c\x0bd\x1fe") == "abcde"
    assert clean_text("x\ud800y\udfffz") == "xyz"
    assert clean_text("\ufffe\uffff") == ""
    assert clean_text("\t\n\r") == "\t\n\r"
    assert clean_text("\ud7ff\ue000\ufffd\U00010000\U0010ffff") == "\ud7ff\ue000\ufffd\U00010000\U0010ffff"
    assert clean_text("\U0001d11e\U0001f389 caf\u00e9") == "\U0001d11e\U0001f389 caf\u00e9"


def test_xml_text_escapes_markup() -> None:
    assert xml_text("<a href='x'>&\"</a>") == "&lt;a href=&apos;x&apos;&gt;&amp;&quot;&lt;/a&gt;"
    assert xml_text("ok\x00") == "ok"
    assert xml_text("a\rb\r\n") == "a&#13;b&#13;\n"


def test_speak_quotes_attributes() -> None:
    ssml = speak("hi", 'v"oice', "en-US")
    _, voice = parse_speak(ssml)
    assert voice.get("name") == 'v"oice'
    assert_whitespace_between_elements(ssml)


def test_billing_prompt(flow: CallFlow) -> None:
    spoken = flow.render("billing")
    text = (
        "Hello and thank you for calling billing department. "
        "If you are a current customer, press 1. If you are a new customer, press 2."
    )
    assert spoken.text == text
    root, voice = parse_speak(spoken.ssml)
    assert root.get(XML_LANG) == "en-US"
    assert voice.get("name") == "en-US-JessaNeural"
    assert voice.text is not None and voice.text.strip() == text
    assert_whitespace_between_elements(spoken.ssml)


def test_prompt_without_voice_uses_flow_default(flow: CallFlow) -> None:
    _, voice = parse_speak(flow.render("welcome").ssml)
    assert voice.get("name") == "en-US-JennyNeural"


@pytest.mark.parametrize(
    "name",
    ["welcome", "billing", "echo", "transfer_retry", "transfer_final", "handback"],
)
def test_every_default_prompt_renders_well_formed(flow: CallFlow, name: str) -> None:
    spoken = flow.render(name)
    _, voice = parse_speak(spoken.ssml)
    assert voice.text is not None and voice.text.strip() == spoken.text
    assert_whitespace_between_elements(spoken.ssml)


def test_input_ignored_by_prompt_without_placeholder(flow: CallFlow) -> None:
    assert flow.render("billing", {"input": "<evil>"}).text == flow.render("billing").text
