"""dpe_gguf.evaluation.tasks: seeded long-context retrieval prompts, their sizes, layouts and scores.

No model: token counts come from fake tokenizers (whitespace words, characters / 4, and a
word-and-punctuation splitter that does not add up exactly over concatenation).
"""
from __future__ import annotations

import re

import pytest

from dpe_gguf.evaluation import tasks as et
from dpe_gguf.evaluation.tasks import TASKS, Sample, load_haystack, make_sample, make_samples, score


def words(text: str) -> int:
    return len(text.split())


def quarter_chars(text: str) -> int:
    return len(text) // 4


def pieces(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


COUNTERS = {"words": words, "chars4": quarter_chars, "pieces": pieces}


def slack(length: int) -> int:
    """How far below the target a prompt may end (the brief: ~2% or 16 tokens)."""
    return max(16, int(0.02 * length))


def numbers(text: str, digits: int) -> list[str]:
    return re.findall(rf"(?<!\d)\d{{{digits}}}(?!\d)", text)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1024, 8192, 65536])
@pytest.mark.parametrize("counter", ["words", "chars4"])
def test_prompt_length_within_bounds(task, length, counter):
    count = COUNTERS[counter]
    samples = make_samples(task, length, 3, seed=7, count=count)
    assert len(samples) == 3
    for s in samples:
        got = count(s.prompt)
        assert length - slack(length) <= got <= length, (task, length, s.index, got)
        assert s.length == length and s.task == task


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 4096])
def test_prompt_length_with_a_non_additive_counter(task, length):
    for s in make_samples(task, length, 2, seed=3, count=pieces):
        assert length - slack(length) <= pieces(s.prompt) <= length


@pytest.mark.parametrize("task", [t for t in TASKS if t != "multi_key"])
def test_short_prompts_of_128_tokens(task):
    for s in make_samples(task, 128, 3, seed=0, count=words):
        assert 128 - 16 <= words(s.prompt) <= 128


@pytest.mark.parametrize("task", TASKS)
def test_count_is_called_a_few_times_on_prompt_sized_text(task):
    calls, chars = [], []

    def count(text):
        calls.append(1)
        chars.append(len(text))
        return quarter_chars(text)

    samples = make_samples(task, 32768, 2, seed=1, count=count)
    assert len(calls) <= 2 * 8
    # a handful of prompt-sized counts, not one count per filler unit
    assert sum(chars) <= 2 * 8 * max(len(s.prompt) for s in samples)


@pytest.mark.parametrize("task", TASKS)
def test_too_short_a_length_is_refused(task):
    with pytest.raises(ValueError, match="too short"):
        make_samples(task, 20, 1, seed=0, count=words)


def test_multi_key_needs_more_than_128_tokens_but_fits_256():
    with pytest.raises(ValueError, match="multi_key"):
        make_samples("multi_key", 128, 1, seed=0, count=quarter_chars)
    assert make_samples("multi_key", 256, 1, seed=0, count=quarter_chars)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("task", TASKS)
def test_same_arguments_give_identical_samples(task):
    a = make_samples(task, 2048, 4, seed=11, count=words)
    b = make_samples(task, 2048, 4, seed=11, count=words)
    assert a == b
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]


@pytest.mark.parametrize("task", TASKS)
def test_other_seed_other_keys(task):
    a = make_samples(task, 2048, 4, seed=11, count=words)
    b = make_samples(task, 2048, 4, seed=12, count=words)
    assert [s.answers for s in a] != [s.answers for s in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    # trials of one run differ from each other too
    assert len({s.answers for s in a}) == len(a)


@pytest.mark.parametrize("task", TASKS)
def test_calibration_prompts_are_not_the_evaluation_prompts(task):
    """Calibration draws its own stream: a table is never tuned on the prompts it is scored on."""
    ev = make_samples(task, 2048, 6, seed=0, count=words)
    cal = make_samples(task, 2048, 6, seed=0, count=words, split="calibration")
    assert make_samples(task, 2048, 6, seed=0, count=words, split="eval") == ev
    assert not {a for s in ev for a in s.answers} & {a for s in cal for a in s.answers}
    assert all(x.prompt != y.prompt for x in ev for y in cal)
    assert [s.depth for s in cal] == [s.depth for s in ev]


def test_evaluation_prompts_are_the_published_ones():
    """docs/RESULTS.md was measured on these prompts: the evaluation stream must not move."""
    assert [s.answers for s in make_samples("passkey", 2048, 2, 0, words)] == [("87154",), ("18060",)]
    assert [s.answers for s in make_samples("multi_needle", 2048, 2, 0, words)] == [("7074061",), ("5128715",)]


def test_other_length_other_keys():
    a = make_samples("multi_needle", 1024, 3, seed=5, count=words)
    b = make_samples("multi_needle", 2048, 3, seed=5, count=words)
    assert [s.answers for s in a] != [s.answers for s in b]


def test_depths_evenly_spaced():
    assert [s.depth for s in make_samples("passkey", 512, 5, 0, words)] == [0, 0.25, 0.5, 0.75, 1]
    assert [s.depth for s in make_samples("multi_query", 512, 1, 0, words)] == [0.5]
    assert [s.depth for s in make_samples("passkey", 512, 2, 0, words)] == [0, 1]
    assert make_samples("passkey", 512, 0, 0, words) == []
    assert [s.index for s in make_samples("multi_key", 512, 3, 0, words)] == [0, 1, 2]


# ---------------------------------------------------------------- passkey layout

def test_passkey_layout_and_answer():
    for s in make_samples("passkey", 1024, 5, seed=2, count=words):
        key, = s.answers
        assert re.fullmatch(r"[1-9]\d{4}", key)
        info = et.PASSKEY_INFO.format(key=key)
        assert info == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert s.prompt.count(info) == 1
        assert s.prompt.count(key) == 2
        lines = s.prompt.split("\n")
        assert len(lines) == 5
        assert lines[0] == et.PASSKEY_TASK and lines[2] == info
        assert lines[4] == "What is the pass key? The pass key is"
        assert s.max_tokens == 8
        # the filler on both sides of the key reads as one run of the repeated passage
        filler = " ".join(p for p in (lines[1], lines[3]) if p)
        sentences = re.split(r"(?<=\.) ", filler)
        assert len(sentences) > 100
        assert sentences == [et.FILLER_SENTENCES[j % 5] for j in range(len(sentences))]


def test_passkey_depth_moves_the_key():
    samples = make_samples("passkey", 4096, 5, seed=4, count=words)
    rel = []
    for s in samples:
        info = et.PASSKEY_INFO.format(key=s.answers[0])
        rel.append(s.prompt.index(info) / len(s.prompt))
    assert rel == sorted(rel) and rel[-1] - rel[0] > 0.9
    first, last = samples[0], samples[-1]
    assert first.prompt.startswith(et.PASSKEY_TASK + "\n\n" + et.PASSKEY_INFO.format(key=first.answers[0]))
    assert last.prompt.endswith(et.PASSKEY_INFO.format(key=last.answers[0]) + "\n\n" + et.PASSKEY_QUESTION)
    middle = samples[2]
    lines = middle.prompt.split("\n")
    assert abs(words(lines[1]) - words(lines[3])) <= 4  # half the filler on each side


def test_passkey_full_copies_of_the_filler():
    # with a prefix of whole copies, the prefix is the copies joined by spaces
    s = make_samples("passkey", 2048, 5, seed=0, count=words)[0]
    suffix = s.prompt.split("\n")[3]
    copies = suffix.count(et.FILLER_SENTENCES[0])
    assert copies > 50
    assert suffix.startswith(" ".join([et.FILLER] * (copies - 1)))


# ---------------------------------------------------------------- the needle tasks

NEEDLE_RE = re.compile(r"The special magic number for (\S+) is: (\d{7})\.")
NEEDLE_MV_RE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")


@pytest.mark.parametrize("length", [512, 16384])
def test_multi_needle(length):
    for s in make_samples("multi_needle", length, 5, seed=9, count=words):
        assert s.prompt.startswith(et.INSTRUCTION_ONE + "\n")
        assert s.prompt.split("\n")[0] == ("Some special magic numbers are hidden in the following text. "
                                           "Remember them; you will be asked about one of them.")
        found = NEEDLE_RE.findall(s.prompt)
        assert len(found) == 4
        keys = [k for k, _ in found]
        assert len(set(keys)) == 4 and set(keys) <= set(et.WORDS)
        asked = re.search(r"What is the special magic number for (\w+)\? "
                          r"The special magic number for \1 is:$", s.prompt).group(1)
        assert s.answers == (dict(found)[asked],)
        assert s.max_tokens == 12
        assert_once(s)


def test_multi_key():
    for s in make_samples("multi_key", 2048, 5, seed=9, count=words):
        found = NEEDLE_RE.findall(s.prompt)
        assert len(found) == 8
        keys = [k for k, _ in found]
        assert len(set(keys)) == 8
        parts = {p for k in keys for p in k.split("-")}
        assert len(parts) == 4 and parts <= set(et.WORDS)   # look-alike keys from four words
        asked = re.search(r"What is the special magic number for (\S+)\? "
                          r"The special magic number for \1 is:$", s.prompt).group(1)
        assert asked in keys
        assert s.answers == (dict(found)[asked],)
        assert s.max_tokens == 12
        assert_once(s)


def test_multi_value():
    for s in make_samples("multi_value", 2048, 5, seed=9, count=words):
        found = NEEDLE_MV_RE.findall(s.prompt)
        assert len(found) == 4
        assert len({k for k, _ in found}) == 1
        word = found[0][0]
        assert s.prompt.endswith(f"What are all the special magic numbers for {word}? "
                                 f"The special magic numbers for {word} are:")
        assert sorted(s.answers) == sorted(v for _, v in found) and len(set(s.answers)) == 4
        assert s.max_tokens == 48
        assert_once(s)


def test_multi_query():
    for s in make_samples("multi_query", 2048, 5, seed=9, count=words):
        found = dict(NEEDLE_RE.findall(s.prompt))
        assert len(found) == 4
        m = re.search(r"What are the special magic numbers for (\w+), (\w+), (\w+) and (\w+)\? "
                      r"The special magic numbers for \1, \2, \3 and \4 are:$", s.prompt)
        assert m, s.prompt[-200:]
        asked = m.groups()
        assert sorted(asked) == sorted(found)
        assert s.answers == tuple(found[w] for w in asked)
        assert s.max_tokens == 48
        assert_once(s)


def assert_once(s: Sample):
    for a in s.answers:
        assert re.fullmatch(r"[1-9]\d{6}", a)
        assert s.prompt.count(a) == 1
    # no other long numbers in the prompt: the needles' values are the only 7-digit ones
    assert len(numbers(s.prompt, 7)) == len(re.findall(r"magic numbers? for \S+ is: ", s.prompt))
    assert not re.search(r"\d{8,}", s.prompt)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "passkey"])
def test_needle_depth_placement(task):
    samples = make_samples(task, 4096, 5, seed=21, count=words)
    needle_re = NEEDLE_MV_RE if task == "multi_value" else NEEDLE_RE
    rel = []
    for s in samples:
        first = needle_at_sample_depth(s, needle_re)
        rel.append(s.prompt.index(first) / len(s.prompt))
    assert rel == sorted(rel) and rel[0] < 0.05 and rel[-1] > 0.95
    for i in (1, 2, 3):
        assert abs(rel[i] - samples[i].depth) < 0.05
    head = samples[0].prompt.split("\n")[0]
    assert samples[0].prompt.startswith(head + "\n" + needle_at_sample_depth(samples[0], needle_re))
    last = samples[-1]
    question = last.prompt.split("\n")[-1]
    assert question.startswith("What ")
    assert last.prompt.endswith(needle_at_sample_depth(last, needle_re) + "\n\n" + question)


def needle_at_sample_depth(s: Sample, needle_re) -> str:
    """The needle sentence placed at the sample's depth.

    multi_needle / multi_key ask about it, multi_value lists its value first; for multi_query (whose
    question order is shuffled) it is the first needle at depth 0, the last at depth 1, and otherwise
    the one nearest the depth.
    """
    texts = {m.group(2): m.group(0) for m in needle_re.finditer(s.prompt)}
    if s.task != "multi_query":
        return texts[s.answers[0]]
    ordered = sorted(texts.values(), key=s.prompt.index)
    if s.depth in (0, 1):
        return ordered[0] if s.depth == 0 else ordered[-1]
    return min(ordered, key=lambda c: abs(s.prompt.index(c) / len(s.prompt) - s.depth))


def test_needles_sit_at_sentence_or_paragraph_boundaries():
    for s in make_samples("multi_key", 8192, 5, seed=2, count=words):
        for m in NEEDLE_RE.finditer(s.prompt):
            before, after = s.prompt[:m.start()], s.prompt[m.end():]
            if after.startswith("\n\nWhat is"):
                continue  # depth 1: at the end of the text, wherever the cut fell
            assert before.endswith("\n") or re.search(r"[.!?] $", before), before[-40:]
            assert after[:1] in (" ", "\n"), after[:40]


# ---------------------------------------------------------------- scoring

def make(answers):
    return Sample(task="multi_value", length=0, index=0, depth=0.0, prompt="", answers=answers, max_tokens=48)


def test_score_full_partial_none():
    s = make(("1234567", "2345678", "3456789", "4567890"))
    assert score(s, "1234567, 2345678, 3456789 and 4567890.") == 1.0
    assert score(s, " 2345678 and 4567890") == 0.5
    assert score(s, "3456789") == 0.25
    assert score(s, "I do not know.") == 0.0
    assert score(s, "") == 0.0


def test_score_whole_numbers_only():
    s = make(("12345",))
    assert score(s, "123456") == 0.0
    assert score(s, "012345") == 0.0
    assert score(s, "1234") == 0.0
    assert score(s, "12345") == 1.0
    assert score(s, " 12345.") == 1.0
    assert score(s, "key:12345abc") == 1.0
    assert score(make(("12345", "12345")), "12345") == 1.0


def test_score_a_sample_from_its_own_prompt():
    s = make_samples("multi_query", 1024, 1, seed=0, count=words)[0]
    assert score(s, " ".join(s.answers)) == 1.0
    assert score(s, " ".join(s.answers[:3])) == 0.75
    assert score(s, " ".join(a + "0" for a in s.answers)) == 0.0


def test_to_dict():
    s = make_samples("passkey", 256, 1, seed=0, count=words)[0]
    d = s.to_dict()
    assert d == dict(task="passkey", length=256, index=0, depth=0.5, prompt=s.prompt,
                     answers=[s.answers[0]], max_tokens=8)


# ---------------------------------------------------------------- haystack

def test_shipped_haystack():
    text = load_haystack()
    assert len(text) >= 350_000
    assert not re.search(r"\d{5,}", text)
    assert "\n\n\n" not in text
    assert not re.search(r"^(>>>|\.\.\.| {4})", text, re.M)
    assert load_haystack() is text  # read once


def test_user_haystack(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time a fox met a crow. The crow held a cheese; order 1234567890 was "
                    "lost.\n\nThe fox spoke kindly. The crow sang, and the cheese fell.\n", encoding="utf-8")
    text = load_haystack(path)
    assert text.startswith("Once upon a time") and load_haystack(str(path)) == text
    samples = make_samples("multi_needle", 1024, 3, seed=0, count=words, haystack=text)
    for s in samples:
        assert "The fox spoke kindly." in s.prompt and "argparse" not in s.prompt
        assert "1234567890" not in s.prompt          # long digit runs are dropped from haystacks
        assert s.prompt.count("The fox spoke kindly.") > 10  # a short text repeats
        assert 1024 - 20 <= words(s.prompt) <= 1024
        assert_once(s)
    assert samples != make_samples("multi_needle", 1024, 3, seed=0, count=words)


def test_empty_haystack_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_haystack(path)
    with pytest.raises(ValueError):
        make_samples("multi_needle", 512, 1, 0, words, haystack="12345678")


def test_words_are_distinct_and_not_inside_each_other():
    assert len(et.WORDS) >= 100 and len(set(et.WORDS)) == len(et.WORDS)
    assert not [(a, b) for a in et.WORDS for b in et.WORDS if a != b and a in b]


# ---------------------------------------------------------------- errors

def test_unknown_task():
    with pytest.raises(ValueError) as e:
        make_samples("needle", 1024, 1, 0, words)
    for task in TASKS:
        assert task in str(e.value)


@pytest.mark.parametrize("length", [0, -5, 1.5])
def test_bad_length(length):
    with pytest.raises(ValueError):
        make_samples("passkey", length, 1, 0, words)


def test_make_sample_matches_make_samples_and_places_depth():
    count = lambda s: len(s.split())  # noqa: E731
    five = make_samples("multi_needle", 1024, 5, 3, count)
    one = make_sample("multi_needle", 1024, five[2].depth, 3, count, index=2)
    assert one == five[2]
    early = make_sample("passkey", 1024, 0.1, 0, count)
    late = make_sample("passkey", 1024, 0.9, 0, count)
    assert early.prompt.index("The pass key is") < late.prompt.index("The pass key is")
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", 1024, 1.5, 0, count)
