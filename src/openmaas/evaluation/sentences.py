"""English sentences for measuring embeddings when no dataset is given: a small grammar over everyday
vocabulary, expanded with a fixed seed (the same sentences on every machine), in several shapes (statements,
questions, requests, clauses), so texts differ in length, topic and structure like real queries do."""

from __future__ import annotations

import random

_SUBJECTS = (
    "my sister", "the new manager", "our neighbour", "a young doctor", "the old farmer", "the children",
    "my colleague from Berlin", "the team", "a tourist", "the teacher", "our customer", "the pilot",
    "the city council", "a local baker", "the students", "my grandfather", "the software engineer", "the nurse",
)  # fmt: skip
_VERBS = (
    ("bought", "a second-hand bicycle"), ("repaired", "the broken washing machine"),
    ("booked", "a table for six people"), ("wrote", "a long letter to the editor"),
    ("cancelled", "the meeting on Thursday"), ("painted", "the kitchen walls light blue"),
    ("forgot", "the keys at the office"), ("planted", "tomatoes in the garden"),
    ("sold", "the car to a friend"), ("read", "three novels during the holiday"),
    ("ordered", "fresh bread and cheese"), ("lost", "the train ticket"), ("found", "a cheaper flight to Lisbon"),
    ("cooked", "a vegetable curry for dinner"), ("reviewed", "the quarterly budget"),
    ("installed", "the latest security update"), ("visited", "the museum of modern art"),
    ("answered", "every question from the audience"),
)  # fmt: skip
_TIMES = (
    "yesterday", "last summer", "this morning", "on Friday evening", "two weeks ago", "after lunch",
    "before the storm", "during the conference", "at the weekend", "early on Monday",
)  # fmt: skip
_REASONS = (
    "because the old one was too slow", "although it was raining", "so that everyone could join",
    "since the shop was closing", "while the others were waiting outside", "after reading the reviews",
    "before the prices went up", "as the doctor had suggested",
)  # fmt: skip
_QUESTIONS = (
    "How do I reset my password", "Where can I find the nearest pharmacy", "What time does the last bus leave",
    "Can you recommend a good book about history", "Why is the sky blue during the day",
    "How long does it take to learn Spanish", "Is it safe to swim in the lake in winter",
    "Which laptop is best for video editing", "When does the library open on Sundays",
    "How much water should a plant get each week", "What is the difference between weather and climate",
    "Who won the football match last night",
)  # fmt: skip
_TOPICS = (
    "The price of electricity rose sharply", "Heavy snow closed the mountain roads",
    "The company reported record profits", "Scientists discovered a new species of frog",
    "The hospital opened a new children's ward", "Interest rates stayed the same",
    "The film festival attracted thousands of visitors", "A small earthquake shook the coastal town",
    "The bakery on the corner won a national prize", "Train services were delayed by a signal failure",
)  # fmt: skip
_PLACES = (
    "in the north of the country", "across the region", "in several large cities", "near the border",
    "along the coast", "in the capital", "for the third year in a row", "despite the warnings",
)  # fmt: skip
_REQUESTS = (
    "Please send the report to the finance team", "Could you turn off the lights when you leave",
    "Remember to water the plants", "Let me know if the parcel arrives", "Please bring your passport",
    "Don't forget to back up your files", "Call me when you reach the station",
    "Please check the spelling before you publish it",
)  # fmt: skip
_ENDINGS = ("by Friday", "tonight", "before the meeting", "as soon as possible", "tomorrow morning", "next week")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def english_sentences(n: int = 600, seed: int = 7) -> list[str]:
    """``n`` distinct sentences, the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        shape = rng.randrange(6)
        if shape == 0:
            verb, obj = rng.choice(_VERBS)
            s = _cap(f"{rng.choice(_SUBJECTS)} {verb} {obj} {rng.choice(_TIMES)}.")
        elif shape == 1:
            verb, obj = rng.choice(_VERBS)
            s = _cap(f"{rng.choice(_TIMES)}, {rng.choice(_SUBJECTS)} {verb} {obj} {rng.choice(_REASONS)}.")
        elif shape == 2:
            s = f"{rng.choice(_QUESTIONS)}?"
            if rng.random() < 0.5:
                s = f"{rng.choice(('Sorry to bother you, but', 'Quick question:', 'I was wondering,'))} {s[0].lower()}{s[1:]}"
        elif shape == 3:
            s = f"{rng.choice(_TOPICS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        elif shape == 4:
            s = f"{rng.choice(_REQUESTS)} {rng.choice(_ENDINGS)}."
        else:
            (v1, o1), (v2, o2) = rng.sample(_VERBS, 2)
            s = _cap(f"{rng.choice(_SUBJECTS)} {v1} {o1}, and then {rng.choice(_SUBJECTS)} {v2} {o2}.")
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
