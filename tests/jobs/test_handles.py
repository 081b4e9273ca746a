"""Handle and class-word rules, each refusal with its own message, and handle suggestions."""

from __future__ import annotations

import pytest

from jobs.handles import ClassWordError, HandleError, normalize_class_word, suggest_handle, validate_handle


@pytest.mark.parametrize("handle", ["zorbq", "qx7", "vexlyn2024", "a" * 3 + "zq" * 10 + "b"])
def test_valid_handles_are_accepted(handle):
    assert validate_handle(handle, "woman") == handle


def test_handles_are_trimmed_and_lower_cased():
    assert validate_handle("  ZorbQ ") == "zorbq"


@pytest.mark.parametrize(
    ("handle", "class_word", "message"),
    [
        ("zq", None, "at least 3 characters"),
        ("zq" * 13, None, "24 characters or fewer"),
        ("zorb q", None, "letters a–z and the digits 0–9"),
        ("zörbq", None, "letters a–z and the digits 0–9"),
        ("zorb_q", None, "letters a–z and the digits 0–9"),
        ("12345", None, "at least one letter"),
        ("dragon", None, "'dragon' is a common English word"),
        ("alex", None, "'alex' is a common English word"),
        ("cat7", None, "built on the common English word 'cat'"),
        ("woman", "woman", "can't contain your class word 'woman'"),
        ("zqwomanx", "woman", "can't contain your class word 'woman'"),
        ("manzq", "old man", "can't contain your class word 'man'"),
    ],
)
def test_each_refusal_says_why(handle, class_word, message):
    with pytest.raises(HandleError) as refused:
        validate_handle(handle, class_word)
    assert message in refused.value.reason
    assert "Traceback" not in refused.value.reason


def test_word_refusals_come_with_a_valid_suggestion():
    with pytest.raises(HandleError) as refused:
        validate_handle("dragon", "person")
    suggestion = refused.value.reason.split("How about '")[1].rstrip("'?")
    assert validate_handle(suggestion, "person") == suggestion


def test_class_word_of_another_kind_is_no_reason_to_refuse():
    assert validate_handle("manzq", "woman") == "manzq"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("woman", "woman"), (" Old   Man ", "old man"), ("young adult person", "young adult person")],
)
def test_class_words_are_normalised(text, expected):
    assert normalize_class_word(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "what kind of subject"),
        ("   ", "what kind of subject"),
        ("a very old grey man", "one to three plain words"),
        ("man2", "one to three plain words"),
        ("femme-fatale", "one to three plain words"),
        ("extraordinarily longworded", "keep it to 24 characters"),
    ],
)
def test_bad_class_words_are_refused_with_a_reason(text, message):
    with pytest.raises(ClassWordError) as refused:
        normalize_class_word(text)
    assert message in refused.value.reason


def test_suggestion_comes_from_the_discord_name_and_is_valid():
    suggestion = suggest_handle("Alex ✨", set())
    assert suggestion.startswith("alex") and suggestion != "alex"
    assert validate_handle(suggestion) == suggestion
    assert suggest_handle("zorblax", set()) == "zorblax"  # already rare: kept as it is
    assert suggest_handle("Zoë", set()).startswith("zoe")


def test_suggestion_is_deterministic_and_avoids_taken_handles():
    first = suggest_handle("Alex", set())
    assert suggest_handle("Alex", set()) == first
    second = suggest_handle("Alex", {first})
    assert second != first and second.startswith("alex")
    assert suggest_handle("Alex", lambda h: h in {first, second}) not in {first, second}


def test_suggestion_never_gives_up_even_when_many_are_taken():
    taken: set[str] = set()
    for _ in range(40):
        taken.add(suggest_handle("Alex", taken))
    assert len(taken) == 40
    assert all(validate_handle(h) == h for h in taken)


@pytest.mark.parametrize(
    ("name", "class_word"),
    [
        ("🙂🙂", None),
        ("12345", None),
        ("WomanPower", "woman"),
        ("a", None),
        ("x" * 60, None),
        ("Avatar", "avatar"),
    ],
)
def test_suggestion_for_awkward_names_is_still_valid(name, class_word):
    suggestion = suggest_handle(name, set(), class_word)
    assert validate_handle(suggestion, class_word) == suggestion
