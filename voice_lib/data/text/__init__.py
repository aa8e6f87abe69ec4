"""Text frontend shared by training, evaluation, the server and QC.

Raw text -> SSML-lite segments and pauses (``ssml``) -> normalised words (``normalize``: numbers, dates,
money, units... read as words, by WeTextProcessing's grammars) -> phone symbols with pronunciation overrides
(``lexicon``, ``phonemes``) -> integer ids from a fixed, versioned inventory (``symbols``). ``chunks``
turns a request's text into speech chunks and silences (``plan_speech``) and splits sentences for streaming. The table the normaliser was picked by is ``normalization_cases.tsv``.

Importing the package is cheap (it is reached from Airflow DAG parsing): espeak-ng, pypinyin and the grammars
load on first use.
"""
from voice_lib.data.text.chunks import (
    BREAK_STRENGTHS,
    SpeechChunk,
    plan_speech,
    split_sentences,
)
from voice_lib.data.text.lexicon import (
    Lexicon,
    LexiconError,
    load_lexicon,
    save_lexicon,
)
from voice_lib.data.text.normalize import clean_text, normalize_text
from voice_lib.data.text.phonemes import (
    configure_frontend_cache,
    count_phones,
    frontend_cache_info,
    phonemize,
)
from voice_lib.data.text.symbols import (
    FRONTEND_VERSION,
    PAD,
    PAUSE_TOKENS,
    STRESS_MARKS,
    SYMBOLS,
    SYMBOLS_VERSION,
    UNK,
    WORD_BOUNDARY,
    FrontendUnavailable,
    Language,
    TextError,
    Unpronounceable,
    phonemes_to_ids,
    split_by_script,
    symbol_to_id,
)
from voice_lib.data.text.timing import WordSpan, word_timings

__all__ = [
    "TextError", "FrontendUnavailable", "FRONTEND_VERSION", "Language", "SYMBOLS_VERSION", "SYMBOLS", "PAD", "UNK", "WORD_BOUNDARY",
    "PAUSE_TOKENS", "STRESS_MARKS", "symbol_to_id", "normalize_text", "clean_text", "split_by_script",
    "phonemize", "phonemes_to_ids", "count_phones", "split_sentences",
    "frontend_cache_info", "configure_frontend_cache", "Unpronounceable",
    "plan_speech", "SpeechChunk", "BREAK_STRENGTHS", "Lexicon", "LexiconError", "load_lexicon", "save_lexicon",
    "WordSpan", "word_timings",
]
