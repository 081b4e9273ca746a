"""The prompt filter and the rule of where it and the image checker's verdicts apply."""

from __future__ import annotations

from types import SimpleNamespace

import discord
import pytest

from bot.config import Settings
from bot.prompt_filter import SHIPPED_LIST, PromptFilter, normalise, read_entries
from bot.safety import PROMPT_REFUSED, Safety, filter_applies, place_of, withheld_note
from jobs.payloads import Picture
from jobs.requests import GenerateRequest

SHIPPED = PromptFilter.load()


@pytest.mark.parametrize("prompt", [
    "a nude portrait", "NUDE", "Nude, on a beach", "n.u.d.e", "n u d e", "a n-u-d-e woman", "nuuuude", "nud3",
    "p0rn", "pr0n star", "pornographic", "naked  child", "na\u200bked", "ｎｕｄｅ", "nüde", "a photo, naked!",
    "masturbating", "decapitated knight", "a rapist", "h3ntai",
])
def test_the_shipped_list_sees_through_simple_disguises(prompt):
    assert SHIPPED.blocks(prompt)


@pytest.mark.parametrize("prompt", [
    "zqjane as an astronaut on the moon", "a class photo", "my therapist in her office", "Scunthorpe at dawn",
    "Sussex and Middlesex", "an assassin in a cocktail bar", "analysis of a glass", "a gorilla", "grapes",
    "drapes", "undressing the tree for winter", "an Al Pacino portrait", "J. R. R. Tolkien reading",
    "a 3d render of a dog", "",
])
def test_the_shipped_list_lets_innocent_prompts_through(prompt):
    assert not SHIPPED.blocks(prompt)


def test_words_match_whole_however_disguised_never_inside_other_words():
    own = PromptFilter(["cunt", "ass", "rapist", "boobs", "masturbat*", "severed head"])
    for bad in ("a cunt", "@$$", "4ss", "a-s-s", "RAPIST", "b00bs", "booooobs", "masturbation", "a severed  head"):
        assert own.blocks(bad), bad
    for fine in ("Scunthorpe", "class", "therapist", "as", "bobs", "a severed rope", "mass", "assets"):
        assert not own.blocks(fine), fine


def test_only_the_texts_asked_about_are_read():
    assert SHIPPED.blocks("a photo", "nude")
    assert not SHIPPED.blocks("a photo", None)


def test_list_files_skip_comments_and_blank_lines(tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("# the operator's own\n\nzqbanned\n  Clown Shoes  \n", encoding="utf-8")
    assert read_entries(own.read_text().splitlines()) == ["zqbanned", "Clown Shoes"]
    loaded = PromptFilter.load(own)
    assert loaded.blocks("ZQBANNED") and loaded.blocks("two clown shoes") and loaded.blocks("nude")
    assert loaded.size == SHIPPED.size + 2
    assert normalise("  Two\tCLOWN  shöes ") == "two clown shoes"


def test_each_shipped_entry_is_read_and_blocks_itself():
    entries = read_entries(SHIPPED_LIST.read_text(encoding="utf-8").splitlines())
    assert len(entries) == SHIPPED.size
    for entry in entries:
        assert PromptFilter([entry]).blocks(entry.rstrip("*")), entry


class Nsfw:
    """A server channel with Discord's age-restricted flag."""

    def __init__(self, nsfw: bool) -> None:
        self.nsfw = nsfw

    def is_nsfw(self) -> bool:
        return self.nsfw


def test_where_the_filter_applies():
    dm = discord.DMChannel.__new__(discord.DMChannel)
    assert place_of(dm) == "dm"
    assert place_of(Nsfw(True)) == "age_restricted"
    assert place_of(Nsfw(False)) == place_of(None) == place_of(SimpleNamespace()) == "server"
    for safety in ("off", "prompts", "images"):
        for opened in (False, True):
            settings = Settings(safety=safety, nsfw_in_age_restricted=opened)
            assert filter_applies(settings, "dm") == (safety != "off")
            assert filter_applies(settings, "server")  # whatever SAFETY says
            assert filter_applies(settings, "age_restricted") == (not opened)


async def test_requests_are_refused_and_pictures_withheld_by_that_rule():
    safety = Safety(Settings(safety="off", nsfw_in_age_restricted=True))
    safety.prompts = SHIPPED
    nude = GenerateRequest(prompt="a nude portrait")
    assert await safety.refusal(nude, Nsfw(False)) == PROMPT_REFUSED
    assert await safety.refusal(nude, Nsfw(True)) is None
    assert await safety.refusal(GenerateRequest(prompt="a portrait", negative_prompt="nude"), Nsfw(False)) is None
    pictures = [Picture(b"a", 1, flagged=True), Picture(b"b", 2, flagged=False), Picture(b"c", 3)]
    assert safety.shown(pictures, Nsfw(False)) == (pictures[1:], 1)
    assert safety.shown(pictures, Nsfw(True)) == (pictures, 0)
    assert withheld_note(1) == "1 picture was withheld by this server's safety filter."
    assert withheld_note(3) == "3 pictures were withheld by this server's safety filter."
