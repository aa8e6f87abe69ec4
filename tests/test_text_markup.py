"""SSML-lite, pronunciation lexicons and inline overrides (voice_lib.data.text.chunks/lexicon), against the real
espeak-ng, pypinyin and WeTextProcessing, and a real LocalStore on disk."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voice_lib.core.storage import LocalStore
from voice_lib.data.text import (
    BREAK_STRENGTHS,
    SYMBOLS,
    Lexicon,
    LexiconError,
    TextError,
    Unpronounceable,
    load_lexicon,
    phonemes_to_ids,
    phonemize,
    plan_speech,
    save_lexicon,
)
from voice_lib.data.text.lexicon import lexicon_prefix, lexicon_versions

TOMATO = ("t", "ə", "m", "ˈ", "ɑː", "t", "oʊ")


def phones(text: str, language: str = "en", **kwargs) -> list[str]:
    return [p for chunk in plan_speech(text, language, **kwargs) for p in chunk.phonemes]


# --- SSML-lite -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag, seconds", [
    ('<break time="700ms"/>', 0.7), ('<break time="1.5s"/>', 1.5), ("<break time='2s'/>", 2.0),
    ('<break strength="x-strong"/>', 1.25), ('<break strength="none"/>', 0.0), ("<break/>", 0.75),
    ('<BREAK TIME="250MS" />', 0.25),
])
def test_break_becomes_silence_between_the_words(tag, seconds):
    first, second = plan_speech(f"Hello there {tag} general Kenobi.", "en")
    assert (first.text, second.text) == ("Hello there", "general Kenobi.")
    assert first.pause_after == pytest.approx(seconds) and second.pause_after == 0.0
    # Nothing of the tag is read aloud.
    assert (list(first.phonemes), list(second.phonemes)) == (phonemize("Hello there"), phonemize("general Kenobi."))


def test_tags_are_never_spoken():
    plain = phones("Hello wonderful world.")
    marked = ('<speak><prosody rate="slow"><emphasis level="strong">Hello</emphasis></prosody> '
              '<say-as interpret-as="x">wonderful</say-as> <unknown-tag a="1">world</unknown-tag>.</speak>')
    assert phones(marked) == plain
    assert phones("<b>Hello</b> <i>wonderful</i> <voice name='x'>world</voice>.") == plain
    # Only markup goes: a "<" that starts no tag is still text.
    assert plan_speech("3 < 5 > 2", "en")[0].text == "3 < 5 > 2"


def test_xml_entities_are_read_as_their_characters():
    assert phones("Tom &amp; Jerry") == phones("Tom & Jerry") == phones("Tom and Jerry")


def test_sentence_pause_follows_each_sentence_but_not_the_last():
    chunks = plan_speech("One. Two! Three?", "en", sentence_pause=0.4)
    assert [c.pause_after for c in chunks] == [0.4, 0.4, 0.0]
    assert [c.pause_after for c in plan_speech("One. Two!", "en")] == [0.0, 0.0]
    # A break replaces the sentence pause where it stands.
    chunks = plan_speech('One. <break time="2s"/> Two. Three.', "en", sentence_pause=0.4)
    assert [c.pause_after for c in chunks] == [2.0, 0.4, 0.0]
    # Parts of one long sentence, split at clauses to fit max_chars, have no pause between them.
    chunks = plan_speech("one two three, four five six, seven eight nine.", "en", sentence_pause=0.4, max_chars=18)
    assert len(chunks) == 3 and [c.pause_after for c in chunks] == [0.0, 0.0, 0.0]


def test_trailing_break_and_silent_chunks_keep_their_silence():
    chunks = plan_speech('Hello. <break time="1s"/>', "en")
    assert len(chunks) == 1 and chunks[0].pause_after == 1.0
    chunks = plan_speech('Hello. <break time="1s"/> ... <break time="500ms"/> Bye.', "en")
    assert [c.pause_after for c in chunks] == [1.5, 0.0]


@pytest.mark.parametrize("text, names", [
    ('Hi <break time="soon"/> there', 'time="soon"'),
    ('Hi <break time="11s"/> there', "longer than 10 s"),
    ('Hi <break strength="loud"/> there', 'strength="loud"'),
])
def test_bad_break_is_a_clear_text_error(text, names):
    with pytest.raises(TextError, match=names):
        plan_speech(text, "en")


@pytest.mark.parametrize("pause", [-0.1, 5.5])
def test_sentence_pause_out_of_range(pause):
    with pytest.raises(TextError, match="sentence_pause must be between 0 and 5"):
        plan_speech("Hi.", "en", sentence_pause=pause)


def test_only_markup_has_nothing_pronounceable():
    with pytest.raises(Unpronounceable, match="nothing pronounceable"):
        plan_speech('<speak><break time="1s"/></speak>', "en")


# --- inline overrides ------------------------------------------------------------------------------------

def test_phoneme_tag_fixes_the_phones_of_a_word():
    out = phones('I say <phoneme alphabet="ipa" ph="t ə m ˈɑː t oʊ">tomato</phoneme>.')
    assert out[-len(TOMATO) - 1:] == [*TOMATO, "."]
    assert out[: -len(TOMATO) - 2] == phones("I say")
    # The word never reaches the normaliser: a number with fixed phones is not read as a number.
    assert phones('<phoneme ph="w ˈʌ n">2024</phoneme>') == ["w", "ˈ", "ʌ", "n"]


def test_phoneme_tag_in_pinyin():
    assert phones('去<phoneme alphabet="pinyin" ph="chong2 qing4">重庆</phoneme>', "zh") == [
        "q", "u4", "|", "ch", "ong2", "q", "ing4"]
    # Without an alphabet, tone-numbered syllables are pinyin.
    assert phones('<phoneme ph="zhong4">中</phoneme>', "zh") == ["zh", "ong4"]


def test_sub_reads_the_alias():
    assert phones('<sub alias="sequel">SQL</sub> rocks') == phones("sequel rocks")


@pytest.mark.parametrize("tag, names", [
    ('<phoneme alphabet="ipa" ph="k Q t">cat</phoneme>', "'Q' is not a phone of the inventory"),
    ('<phoneme alphabet="pinyin" ph="zhong7">中</phoneme>', "'zhong7' is not a tone-numbered pinyin"),
    ('<phoneme alphabet="x-sampa" ph="k{t">cat</phoneme>', 'alphabet "x-sampa" is not supported'),
    ('<phoneme ph="">cat</phoneme>', "no phones given"),
])
def test_bad_inline_override_names_itself(tag, names):
    with pytest.raises(LexiconError, match=names) as err:
        plan_speech(f"A {tag} here.", "auto")
    assert "<phoneme" in str(err.value) and "docs/text.md" in str(err.value)


def test_private_use_characters_in_the_text_cannot_pose_as_overrides():
    out = phones('\ue000 hello <phoneme ph="k ˈæ t">cat</phoneme> \ue001')
    assert out == [*phonemize("hello", "en"), "|", "k", "ˈ", "æ", "t"]


# --- lexicons --------------------------------------------------------------------------------------------

LEXICON = Lexicon({
    "tomato": {"ipa": "t ə m ˈɑː t oʊ"},
    "US": {"alias": "united states"},
    "New York": {"alias": "the big apple"},
    "重庆": {"pinyin": "chong2 qing4"},
})


def test_lexicon_words_get_their_pronunciation():
    assert phones("Tomato soup.", lexicon=LEXICON)[:len(TOMATO)] == list(TOMATO)  # lower-case entry: any case
    assert phones("The US and us.", lexicon=LEXICON) == phones("The united states and us.")  # "US" only as written
    assert phones("New York, New Jersey.", lexicon=LEXICON) == phones("the big apple, New Jersey.")
    assert phones("tomatoes", lexicon=LEXICON) == phones("tomatoes")  # whole words only
    assert phones("我去重庆。", "zh", lexicon=LEXICON) == [*phonemize("我去", "zh"), "|", "ch", "ong2", "q", "ing4", "."]


def test_inline_override_wins_over_the_lexicon():
    assert phones('<phoneme ph="k ˈæ t">tomato</phoneme>', lexicon=LEXICON) == ["k", "ˈ", "æ", "t"]


def test_voice_entries_win_over_the_tenant_lexicon():
    tenant = Lexicon({"tomato": {"alias": "potato"}, "cat": {"alias": "dog"}})
    merged = tenant.merged(LEXICON)
    assert phones("tomato cat", lexicon=merged) == [*TOMATO, "|", *phonemize("dog", "en")]


@pytest.mark.parametrize("entries, names", [
    ({"cat": "k ˈæ t"}, "lexicon entry 'cat': must be an object with exactly one of"),
    ({"cat": {"ipa": "k ˈæ t", "alias": "dog"}}, "lexicon entry 'cat': must be an object"),
    ({"cat": {"ipa": "k Q t"}}, "lexicon entry 'cat': 'Q' is not a phone"),
    ({"猫": {"pinyin": "mao"}}, "lexicon entry '猫': 'mao' is not a tone-numbered pinyin syllable"),
    ({"cat": {"alias": "  "}}, "lexicon entry 'cat': 'alias' must be a non-empty string"),
    ({"cat": {"alias": "<b>dog</b>"}}, "lexicon entry 'cat': an alias is plain text"),
    ({" cat": {"alias": "dog"}}, "lexicon word ' cat': at most 64 characters, no surrounding spaces"),
    ({"x" * 65: {"alias": "dog"}}, "at most 64 characters"),
])
def test_bad_lexicon_entry_names_the_word(entries, names):
    with pytest.raises(LexiconError, match=names):
        Lexicon(entries)


def test_lexicon_json_roundtrip_and_errors():
    again = Lexicon.from_json(LEXICON.to_json())
    assert again.raw == LEXICON.raw and again.sha256 == LEXICON.sha256
    with pytest.raises(LexiconError, match="not valid JSON"):
        Lexicon.from_json(b"{nope")
    with pytest.raises(LexiconError, match="must be a JSON object"):
        Lexicon.from_json(b"[1, 2]")


def test_lexicons_are_stored_as_immutable_numbered_versions(tmp_path):
    store = LocalStore(tmp_path)
    prefix = lexicon_prefix(voice_id="alice-01")
    assert load_lexicon(store, prefix) is None
    assert save_lexicon(store, prefix, Lexicon({"cat": {"alias": "dog"}})) == 1
    assert save_lexicon(store, prefix, LEXICON) == 2
    assert lexicon_versions(store, prefix) == [1, 2]
    version, latest = load_lexicon(store, prefix)  # type: ignore[misc]
    assert version == 2 and latest.raw == LEXICON.raw
    assert load_lexicon(store, prefix, 1)[1].raw == {"cat": {"alias": "dog"}}  # type: ignore[index]
    with pytest.raises(LexiconError, match="no lexicon version 7 under lexicons/voices/alice-01/"):
        load_lexicon(store, prefix, 7)
    assert lexicon_prefix(tenant="acme") == "lexicons/tenants/acme/"
    with pytest.raises(LexiconError, match="voice_id '../x' must match"):
        lexicon_prefix(voice_id="../x")


# --- anything goes in, ids or a TextError come out ---------------------------------------------------------

_TAGS = st.sampled_from(['<break time="200ms"/>', "<break/>", "<speak>", "</speak>", "<emphasis>", "</emphasis>",
                         '<sub alias="x">', "</sub>", '<phoneme ph="k ˈæ t">', "</phoneme>", "<", ">", "&amp;",
                         '<break time="x"/>', "<p>", "</s>"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_TAGS, st.text(max_size=20)), max_size=12), st.sampled_from(["en", "zh", "auto"]))
def test_plan_speech_gives_inventory_ids_or_a_text_error(parts, language):
    try:
        chunks = plan_speech("".join(parts), language, lexicon=LEXICON, sentence_pause=0.1)
    except TextError:
        return
    for chunk in chunks:
        ids = phonemes_to_ids(list(chunk.phonemes))
        assert ids and all(0 <= i < len(SYMBOLS) for i in ids)
        assert 0.0 <= chunk.pause_after <= 10.0 * len(parts) + 0.1
    assert set(BREAK_STRENGTHS) >= {"medium"}


# --- word timestamps -------------------------------------------------------------------------------------

def said(chunk) -> list[tuple[str, str]]:
    return [(w.word, "".join(chunk.phonemes[w.start:w.end])) for w in chunk.words]


def test_each_spoken_word_knows_its_phones():
    (chunk,) = plan_speech("It costs $3.25, ok?", "en")
    assert [w for w, _ in said(chunk)] == ["It", "costs", "three", "dollars", "twenty", "five", "cents", "ok"]
    assert said(chunk)[2] == ("three", "θɹˈiː")
    # Mandarin runs split per character; an override is one word, as written.
    first, second = plan_speech('我喜欢<phoneme ph="t ə m ˈɑː t oʊ">tomato</phoneme>。你好！', "auto")
    assert said(first) == [("我", "wo3"), ("喜", "xi3"), ("欢", "huan1"), ("tomato", "təmˈɑːtoʊ")]
    assert [w for w, _ in said(second)] == ["你", "好"]


def test_when_espeak_regroups_words_the_piece_is_one_span():
    (chunk,) = plan_speech("I use node.js daily.", "en")
    (span,) = chunk.words  # espeak reads "node.js" as two words (node, J S): no guessing which is which
    assert span.word == "I use nodejs daily" and (span.start, span.end) == (0, len(chunk.phonemes) - 1)


def test_word_timings_add_up_the_durations():
    from voice_lib.data.text import word_timings

    (chunk,) = plan_speech("Hello big world.", "en")
    durations = [3 if p not in ("|", ".") else 10 for p in chunk.phonemes]
    times = word_timings(chunk.words, durations, seconds_per_step=0.01, offset_seconds=1.5)
    hello = chunk.words[0].end - chunk.words[0].start
    assert times[0] == {"word": "Hello", "start": 1.5, "end": round(1.5 + hello * 0.03, 3)}
    assert times[1]["start"] == round(times[0]["end"] + 0.10, 3)  # the boundary's 10 steps lie between
    assert [t["word"] for t in times] == ["Hello", "big", "world"]
    assert all(a["end"] <= b["start"] for a, b in zip(times, times[1:]))
    with pytest.raises(ValueError, match="past the 2 durations"):
        word_timings(chunk.words, [1, 1], 0.01)
