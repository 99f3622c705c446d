"""The PyTorch CCRA reference against an independent numpy transcription of shared/CCRA.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccra_export.core.config import CCRAConfig, preset
from ccra_export.model.ccra_module import CCRA, ccra_parameter_count


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_ccra(p: dict[str, np.ndarray], cfg: CCRAConfig, V: np.ndarray, X: np.ndarray, M: np.ndarray):
    """CCRA.md, equation by equation, per image and per head, in float64."""
    B, L, N, _ = V.shape
    H, dh, da = cfg.num_heads, cfg.head_dim, cfg.attn_dim
    eps = cfg.layer_norm_eps
    outs, maps = [], []
    for b in range(B):
        # 1. s = softmax_T(X w_s + (M - 1) * inf); x = sum_t s_t X_t; q = x W_q + b_q
        logits = X[b] @ p["text_score.weight"][0]
        logits = np.where(M[b] == 1, logits, -np.inf)
        s = _softmax(logits, 0)
        q = (s[:, None] * X[b]).sum(0) @ p["query.weight"].T + p["query.bias"]
        # 2. K_{l,n} = LN_k(V_{l,n}) W_k + b_k + E_l; A_h = softmax over all (l, n); A = mean_h A_h
        K = _layer_norm(V[b], p["key_norm.weight"], p["key_norm.bias"], eps) @ p["key.weight"].T + p["key.bias"]
        K = K + p["layer_embed"][:, None, :]
        A = np.zeros((L, N))
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            scores = (K[:, :, sl] @ q[sl]) / math.sqrt(dh)
            A += _softmax(scores.reshape(-1), 0).reshape(L, N) / H
        G = L * N * A
        Vp = G[:, :, None] * V[b]
        # 3. alpha_{n,l} = softmax_l((q W_lq) . (V'_{l,n} W_lk + b_lk) / sqrt(da)); F_n = sum_l alpha V'
        lq = q @ p["layer_query.weight"].T
        lk = Vp @ p["layer_key.weight"].T + p["layer_key.bias"]
        alpha = _softmax((lk @ lq) / math.sqrt(da), 0)  # [L, N], softmax over l
        F = (alpha[:, :, None] * Vp).sum(0)
        # 4. P = softmax(LN_p(F) W_pq (LN_p(F) W_pk)^T / sqrt(da)) F W_po
        Fn = _layer_norm(F, p["patch_norm.weight"], p["patch_norm.bias"], eps)
        att = _softmax((Fn @ p["patch_query.weight"].T) @ (Fn @ p["patch_key.weight"].T).T / math.sqrt(da), 1)
        P = att @ (F @ p["patch_out.weight"].T)
        g = 1.0 / (1.0 + np.exp(-((F @ p["gate.weight"].T) @ q) / math.sqrt(da)))
        outs.append(F + p["gamma"] * g[:, None] * P)
        maps.append(A)
    return np.stack(outs), np.stack(maps)


@pytest.fixture
def tiny_ccra():
    from ccra_export.model.vision_model import build_model

    config = preset("tiny")
    return build_model(config, seed=3).ccra, config


def _inputs(config, batch=3, text_len=6, seed=0):
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((batch, config.ccra.num_layers, config.num_patches, config.vision.hidden_size))
    X = rng.standard_normal((batch, text_len, config.ccra.text_hidden_size))
    M = np.ones((batch, text_len), np.int64)
    for row, length in zip(range(1, batch), (2, 5), strict=False):  # rows after the first are padded
        M[row, length:] = 0
    return V, X, M


def test_matches_numpy_transcription_of_spec(tiny_ccra):
    module, config = tiny_ccra
    V, X, M = _inputs(config)
    params = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    want_out, want_map = numpy_ccra(params, config.ccra, V, X, M)
    with torch.no_grad():
        got_out, got_map = module.double()(torch.from_numpy(V), torch.from_numpy(X), torch.from_numpy(M))
    np.testing.assert_allclose(got_out.numpy(), want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got_map.numpy(), want_map, rtol=1e-10, atol=1e-12)


def test_attention_map_is_a_joint_distribution_over_layers_and_patches(tiny_ccra):
    module, config = tiny_ccra
    V, X, M = (torch.from_numpy(a) for a in _inputs(config))
    with torch.no_grad():
        _, attention = module.double()(V, X, M)
    np.testing.assert_allclose(attention.sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-12)
    assert attention.shape == (3, config.ccra.num_layers, config.num_patches)


def test_uniform_attention_gives_unit_weight(tiny_ccra):
    """CCRA.md: uniform attention gives G = 1, i.e. V' = V, so LPWCA reduces to layer attention on V."""
    module, config = tiny_ccra
    module = module.double()
    V, X, M = (torch.from_numpy(a) for a in _inputs(config))
    with torch.no_grad():
        module.key.weight.zero_()
        module.key.bias.zero_()
        module.layer_embed.zero_()
        q = module.text_query(X, M)
        fused, attention = module.lpwca(V, q)
        np.testing.assert_allclose(attention.numpy(), 1.0 / (config.ccra.num_layers * config.num_patches), rtol=1e-12)
        alpha = torch.softmax(
            module.layer_key(V) @ module.layer_query(q)[:, None, :, None] / math.sqrt(config.ccra.attn_dim), dim=1
        )
        np.testing.assert_allclose(fused.numpy(), (alpha * V).sum(1).numpy(), rtol=1e-10, atol=1e-12)


def test_padded_text_tokens_do_not_change_the_output(tiny_ccra):
    module, config = tiny_ccra
    V, X, M = _inputs(config, batch=1, text_len=4)
    padded_X = np.concatenate([X, np.random.default_rng(9).standard_normal((1, 5, X.shape[2]))], axis=1)
    padded_M = np.concatenate([M, np.zeros((1, 5), np.int64)], axis=1)
    with torch.no_grad():
        a, _ = module.double()(*(torch.from_numpy(t) for t in (V, X, M)))
        b, _ = module(*(torch.from_numpy(t) for t in (V, padded_X, padded_M)))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_parameter_count_llava_15_7b():
    """Spec reconstruction at llava-1.5-7b sizes, term by term (paper: about 3.55M)."""
    cfg = preset("llava-1.5-7b")
    dv, dt, da, layers = 1024, 4096, 256, 23
    expected = (
        dt  # w_s
        + dt * da
        + da  # W_q, b_q
        + 2 * dv  # LN_k
        + dv * da
        + da  # W_k, b_k
        + layers * da  # E
        + da * da  # W_lq
        + dv * da
        + da  # W_lk, b_lk
        + 2 * dv  # LN_p
        + 3 * dv * da  # W_pq, W_pk, W_g
        + dv * dv  # W_po
        + dv  # gamma
    )
    assert expected == 3_489_280
    assert ccra_parameter_count(cfg.ccra, cfg.vision.hidden_size) == expected


def test_module_is_config_driven():
    cfg = CCRAConfig(feature_layers=(2, 5), text_hidden_size=40, attn_dim=12, num_heads=3)
    module = CCRA(cfg, vision_hidden_size=20, num_patches=9)
    out, attention = module(torch.randn(2, 2, 9, 20), torch.randn(2, 3, 40), torch.ones(2, 3, dtype=torch.int64))
    assert out.shape == (2, 9, 20) and attention.shape == (2, 2, 9)
