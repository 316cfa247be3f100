"""Passkey retrieval and needle-in-a-haystack (single and multi-key) on real haystack text.

A case is built in token ids, not text: instruction + haystack with the needle(s) spliced in +
question, with exactly `length` tokens in all. The needle goes at `depth` (0 = start of the
haystack, 1 = its end) of the haystack, moved back to just after the nearest line or sentence end
within 32 tokens so it does not split a word. The model answers greedily; a case passes when the
digits of its answer start with the needle's value (tokenizer-agnostic: spacing does not matter).

Tasks:
  passkey      one 5-digit pass key, stated twice in the needle (Mohtashami & Jaggi 2023, on real text)
  niah_single  one "special magic number" for a named key, 7 digits (RULER's niah_single)
  niah_multi   four keys with four numbers at different depths; asked for one (RULER's niah_multikey)
"""
import random
import re
from dataclasses import dataclass, field

from salaconvert.errors import InputError

TASKS = ("passkey", "niah_single", "niah_multi")
MULTI_KEYS = 4
_WORDS = ("amber", "basil", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lantern", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "tundra")


@dataclass
class Case:
    task: str
    length: int
    depth: float
    trial: int
    ids: list[int]
    value: str
    needle_at: int  # token index where the asked-for needle starts
    max_new_tokens: int
    extra: dict = field(default_factory=dict)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"


def _texts(task: str, rng: random.Random):
    """(instruction, needles [(text, value)], index of the asked needle, question)."""
    if task == "passkey":
        v = str(rng.randint(10000, 99999))
        return ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the pass key.\n\n",
                [(f"\nThe pass key is {v}. Remember it. {v} is the pass key.\n", v)], 0,
                "\n\nWhat is the pass key? The pass key is")
    n = 1 if task == "niah_single" else MULTI_KEYS
    keys = set()
    while len(keys) < n:
        keys.add(_key(rng))
    needles = []
    for k in sorted(keys):
        v = str(rng.randint(1_000_000, 9_999_999))
        needles.append((f"\nThe special magic number for {k} is: {v}.\n", v))
    asked = rng.randrange(n)
    key = sorted(keys)[asked]
    return ("Some special magic numbers are hidden inside the following text. Memorize them; "
            "I will ask about one of them.\n\n", needles, asked,
            f"\n\nWhat is the special magic number for {key}? The special magic number for {key} is:")


def build_case(task: str, length: int, depth: float, trial: int, haystack: list[int], tokenizer,
               break_ids: set[int], seed: int = 0) -> Case:
    """One prompt of exactly `length` tokens with the asked needle at `depth` of the haystack."""
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, needles, asked, question = _texts(task, rng)
    intro_ids, question_ids = enc(intro), enc(question)
    needle_ids = [enc(text) for text, _ in needles]
    budget = length - len(intro_ids) - len(question_ids) - sum(map(len, needle_ids))
    if budget < 16:
        raise InputError(f"length {length} is too short for {task}: its prompt alone takes "
                         f"{length - budget} tokens; use lengths of at least {length - budget + 64}")
    start = rng.randrange(max(1, len(haystack) - budget))
    hay = list(haystack[start:start + budget])
    if len(hay) < budget:
        raise InputError(f"the haystack has {len(haystack)} tokens, fewer than the {budget} needed")
    # Depth of the asked needle is the one asked for; the others go at random other depths.
    depths = [rng.random() for _ in needles]
    depths[asked] = depth
    places = [_snap(round(d * budget), hay, break_ids) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (places[i], i != asked))
    ids, cut, needle_at = list(intro_ids), 0, -1
    for i in order:
        ids += hay[cut:places[i]]
        cut = places[i]
        if i == asked:
            needle_at = len(ids)
        ids += needle_ids[i]
    ids += hay[cut:] + question_ids
    value = needles[asked][1]
    return Case(task, length, depth, trial, ids, value, needle_at, max_new_tokens=len(enc(" " + value)) + 4,
                extra={"haystack_tokens": budget, "intro_tokens": len(intro_ids)})


def _snap(place: int, hay: list[int], break_ids: set[int], window: int = 32) -> int:
    """Move `place` back to just after a line/sentence-ending token, if one is within `window`."""
    for p in range(place, max(place - window, 0), -1):
        if hay[p - 1] in break_ids:
            return p
    return place


def break_token_ids(tokenizer, ids: list[int]) -> set[int]:
    """The ids among `ids` whose text ends a line or a sentence."""
    return {t for t in set(ids) if re.search(r"[.!?\n]\s*$", tokenizer.decode([t]))}


def passed(answer: str, value: str) -> bool:
    return "".join(re.findall(r"\d", answer)).startswith(value)
