"""Bad input never escapes as a traceback (issue #16): seeded mutations of a small model's header and
of its DPE conversion (tests/gguf_fuzz.py), each through the reader, inspect, convert and strip.

Every outcome must be a clean answer or a DPEError / exit code 2, with the input untouched and no
file left behind. bench/fuzz_reader.py runs the same checks at 100,000 mutations and more.
"""
from __future__ import annotations

import pytest
from gguf_fuzz import OPS, Tally, check_file, make_seeds, mutation, run_fuzz

SEED = 16
COUNT = 5000        # about 20 s on a 2-core machine (4 ms a mutation, four operations)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def test_unmutated_seeds_pass_every_operation(seeds, tmp_path):
    """The seeds themselves: every operation succeeds, except strip of the plain one (no DPE keys)."""
    for seed in seeds:
        tally = Tally()
        check_file(seed.data, f"{seed.name}: unmutated", -1, tmp_path, tally)
        assert tally.n_failures == 0, tally.failures
        refused = {op for op in OPS if tally.counts[(op, "refused")]}
        assert refused == ({"strip"} if seed.name == "plain" else set()), tally.reasons


def test_mutations_depend_on_seed_and_index_only(seeds):
    assert mutation(seeds, SEED, 123) == mutation(seeds, SEED, 123)
    assert mutation(seeds, SEED, 123) != mutation(seeds, SEED, 124)
    assert mutation(seeds, SEED, 123) != mutation(seeds, SEED + 1, 123)


def test_fuzzed_headers_get_an_answer_or_a_clean_refusal(seeds, tmp_path):
    tally = run_fuzz(seeds, tmp_path / "work", SEED, COUNT)
    assert tally.n_failures == 0, f"{tally.n_failures} failures:\n" + "\n".join(map(str, tally.failures))
    # the test can fail: each operation both succeeds and refuses, and every kind of mutation ran
    for op in OPS:
        assert tally.counts[(op, "ok")] > 0 and tally.counts[(op, "refused")] > 0, tally.counts
    assert set(tally.kinds) == {"flip", "int", "float", "type", "utf8", "truncate", "table"}, tally.kinds
    assert any("UTF-8" in reason for _, reason in tally.reasons), tally.reasons
