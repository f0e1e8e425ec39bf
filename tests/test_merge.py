"""Merges checked against hand computations on tiny tensors, plus the properties every merge must keep."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import merge as M
from jaxfound.fusion import sparsify


def arr(*xs):
    return jnp.asarray(xs, jnp.float32)


def close(tree, expected, atol=1e-6):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol), tree, expected)


# Three task vectors over one 4-entry tensor; base is all ones.
BASE = {"w": arr(1, 1, 1, 1)}
TAUS = [arr(3, -1, 0.5, -2), arr(-1, -2, 1, 4), arr(2, 0.2, -3, -1)]
MODELS = [{"w": BASE["w"] + t} for t in TAUS]


# ---------------------------------------------------------------- linear and task arithmetic


def test_linear_weighted_average_by_hand():
    a = {"w": arr(1, 2), "b": arr(0)}
    b = {"w": arr(3, 6), "b": arr(2)}
    close(M.linear([a, b], [1, 3]), {"w": arr(2.5, 5), "b": arr(1.5)})  # (1*1 + 3*3) / 4 = 2.5
    close(M.linear([a, b], [1, 3], normalize=False), {"w": arr(10, 20), "b": arr(6)})
    close(M.linear([a, b]), {"w": arr(2, 4), "b": arr(1)})


def test_task_vectors_are_differences_from_base():
    (tau,) = M.task_vectors({"w": arr(1, 1)}, [{"w": arr(3, -1)}])
    close(tau, {"w": arr(2, -2)})


def test_task_arithmetic_by_hand():
    base = {"w": arr(1, 1, 1)}
    models = [{"w": arr(2, 1, 0)}, {"w": arr(1, 3, 1)}]  # tau = [1,0,-1], [0,2,0]
    # 1 + 2 * (0.5 * tau1 + 1 * tau2) = 1 + 2 * [0.5, 2, -0.5]
    close(M.task_arithmetic(base, models, [0.5, 1], lam=2.0), {"w": arr(2, 5, 0)})
    # normalize divides the mix by 1.5: 1 + 2 * [1/3, 4/3, -1/3]
    close(M.task_arithmetic(base, models, [0.5, 1], lam=2.0, normalize=True), {"w": arr(5 / 3, 11 / 3, 1 / 3)})


# ---------------------------------------------------------------- TIES


def test_trim_mask_keeps_top_k_magnitudes():
    mask = sparsify.trim_mask(arr(0.1, -5, 3, -0.2, 4), 0.4)  # k = int(0.4 * 5) = 2
    np.testing.assert_array_equal(np.asarray(mask), [False, True, False, False, True])


def test_trim_mask_keeps_at_least_one_entry_like_mergekit():
    # int(0.3 * 2) = 0, but mergekit's magnitude() keeps max(1, k): the largest entry survives
    np.testing.assert_array_equal(np.asarray(sparsify.trim_mask(arr(1, -2), 0.3)), [False, True])


def test_ties_keeps_majority_sign_and_takes_disjoint_mean():
    # trimmed (density 0.5 -> 2 of 4): [3,0,0,-2], [0,-2,0,4], [2,0,-3,0]
    # elected signs by summed mass: +5, -2, -3, +2 -> [+, -, -, +]
    # disjoint means: (3+2)/2, -2/1, -3/1, 4/1 (the -2 of model 0 disagrees and is left out)
    merged = M.ties(BASE, MODELS, [1, 1, 1], density=0.5)
    close(merged, {"w": 1 + arr(2.5, -2, -3, 4)})


def test_ties_without_normalize_sums_agreeing_entries_and_applies_lambda():
    merged = M.ties(BASE, MODELS, [1, 1, 1], density=0.5, lam=0.5, normalize=False)
    close(merged, {"w": 1 + 0.5 * arr(5, -2, -3, 4)})


def test_ties_weights_decide_the_election():
    # weighted trimmed: [9,0,0,-6], [0,-2,0,4], [2,0,-3,0]; last entry sums to -2 so model 0 wins it
    # normalised by agreeing weights: (9+2)/(3+1), -2/1, -3/1, -6/3
    merged = M.ties(BASE, MODELS, [3, 1, 1], density=0.5)
    close(merged, {"w": 1 + arr(2.75, -2, -3, -2)})


def test_ties_per_model_density():
    # model 0 keeps 1 entry ([3,0,0,0]), the others keep all four
    merged = M.ties(BASE, MODELS, [1, 1, 1], density=[0.25, 1.0, 1.0])
    # signs: 3-1+2=4 +, -2+0.2=-1.8 -, 1-3=-2 -, 4-1=3 +
    close(merged, {"w": 1 + arr((3 + 2) / 2, -2, -3, 4)})


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_ties_density_one_agreeing_signs_equals_normalized_task_arithmetic(seed):
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=(3, 5))
    base = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
    models = [{"w": base["w"] + sign * rng.uniform(0.1, 2.0, size=(3, 5))} for _ in range(3)]
    weights = rng.uniform(0.2, 2.0, size=3)
    expected = M.task_arithmetic(base, models, weights, normalize=True)
    close(M.ties(base, models, weights, density=1.0), expected, atol=1e-5)


# ---------------------------------------------------------------- DARE


def test_dare_keeps_density_fraction_and_rescales_survivors_to_the_l1_norm():
    base = {"w": jnp.zeros((100, 100))}
    merged = M.dare(base, [{"w": jnp.ones((100, 100))}], [1.0], density=0.3, key=jax.random.key(0))
    w = np.asarray(merged["w"])
    kept = w != 0
    assert abs(kept.mean() - 0.3) < 0.02  # 4 sigma of Binomial(10000, 0.3) / 10000
    # mergekit's rescale: survivors scaled so the task vector keeps its L1 norm (1 / density in expectation)
    np.testing.assert_allclose(w[kept], 10000 / kept.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.abs(w).sum(), 10000, rtol=1e-5)
    plain = np.asarray(M.dare(base, [{"w": jnp.ones((100, 100))}], density=0.3, key=jax.random.key(0),
                              rescale=False)["w"])
    np.testing.assert_array_equal(plain, kept.astype(np.float32))  # the same mask, survivors as they were


def test_dare_is_fixed_by_key_and_differs_across_leaves():
    base = {"a": jnp.zeros(64), "b": jnp.zeros(64)}
    model = {"a": jnp.ones(64), "b": jnp.ones(64)}
    one = M.dare(base, [model], density=0.5, key=jax.random.key(7))
    two = M.dare(base, [model], density=0.5, key=jax.random.key(7))
    close(one, two, atol=0)
    assert not np.array_equal(np.asarray(one["a"]), np.asarray(one["b"]))  # leaf index is folded into the key


def test_dare_with_no_drop_equals_its_combine_step():
    key = jax.random.key(3)
    close(M.dare(BASE, MODELS, [1, 2, 1], density=1.0, key=key, lam=0.7),
          M.task_arithmetic(BASE, MODELS, [1, 2, 1], lam=0.7))
    close(M.dare(BASE, MODELS, [1, 2, 1], density=1.0, key=key, combine="ties", normalize=True),
          M.ties(BASE, MODELS, [1, 2, 1], density=1.0, normalize=True))


def test_dare_ties_elects_signs_on_dropped_vectors():
    # two models on one entry: +1 and -3 with weights 1, 1; at density 1 the minus sign wins alone
    base, models = {"w": arr(0.0)}, [{"w": arr(1.0)}, {"w": arr(-3.0)}]
    close(M.dare(base, models, density=1.0, key=jax.random.key(0), combine="ties"), {"w": arr(-3.0)})


def test_dare_rejects_unknown_combine():
    with pytest.raises(JaxfoundError, match="combine.*'linear' and 'ties'"):
        M.dare(BASE, MODELS, density=0.5, key=jax.random.key(0), combine="mean")


# ---------------------------------------------------------------- Breadcrumbs and DELLA


def test_breadcrumbs_drops_the_outliers_and_the_smallest():
    base, model = {"w": jnp.zeros(10)}, {"w": arr(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)}
    # density 0.5 keeps 5 of 10; gamma 0.2 drops the 2 largest (9, -10) first, so the 3 smallest go: 4 .. 8 remain
    merged = M.breadcrumbs(base, [model], density=0.5, gamma=0.2)
    close(merged, {"w": arr(0, 0, 0, -4, 5, -6, 7, -8, 0, 0)})


def test_della_keeps_density_on_average_prefers_large_entries_and_keeps_the_l1_norm():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(200, 100)).astype(np.float32)
    base = {"x": {"kernel": jnp.zeros((200, 100))}}
    merged = np.asarray(M.della(base, [{"x": {"kernel": jnp.asarray(tau)}}], density=0.4, epsilon=0.2,
                                key=jax.random.key(0), combine="linear")["x"]["kernel"])
    kept = merged != 0
    assert abs(kept.mean() - 0.4) < 0.01  # 5 sigma of 20000 draws
    np.testing.assert_allclose(np.abs(merged).sum(), np.abs(tau).sum(), rtol=1e-4)  # rescale: the L1 norm stays
    # within each output (a kernel's column) keep probability runs from 0.2 (smallest) to 0.6 (largest)
    ranks = np.argsort(np.argsort(np.abs(tau), axis=0), axis=0)
    assert abs(kept[ranks < 50].mean() - 0.25) < 0.02 and abs(kept[ranks >= 150].mean() - 0.55) < 0.02


def test_random_methods_at_density_one_are_their_deterministic_methods():
    key = jax.random.key(0)
    close(M.merge("della", MODELS, [1, 2, 1], base=BASE, density=1.0, key=key),
          M.ties(BASE, MODELS, [1, 2, 1], density=1.0))
    close(M.merge("della_linear", MODELS, [1, 2, 1], base=BASE, density=1.0, key=key, lam=0.5),
          M.task_arithmetic(BASE, MODELS, [1, 2, 1], lam=0.5))
    close(M.merge("breadcrumbs_ties", MODELS, [1, 2, 1], base=BASE, density=1.0),
          M.ties(BASE, MODELS, [1, 2, 1], density=1.0, normalize=False))


def test_coefficients_may_be_functions_of_the_parameter_path():
    base = {"attn": arr(0, 0), "mlp": arr(0, 0)}
    model = {"attn": arr(1, 2), "mlp": arr(1, 2)}
    merged = M.task_arithmetic(base, [model], lam=lambda path: 2.0 if path == "attn" else 0.5)
    close(merged, {"attn": arr(2, 4), "mlp": arr(0.5, 1)})
    soup = M.linear([base, model], weights=lambda path: [1, 3] if path == "mlp" else [1, 1])
    close(soup, {"attn": arr(0.5, 1), "mlp": arr(0.75, 1.5)})


# ---------------------------------------------------------------- SLERP and Model Stock


def test_slerp_by_hand_on_orthogonal_tensors():
    base, other = {"w": arr(1, 0)}, {"w": arr(0, 2)}  # 90 degrees apart; the angle comes from the unit vectors
    s = np.sin(np.pi / 4)
    close(M.slerp(base, other, t=0.5), {"w": arr(s, 2 * s)})
    close(M.slerp(base, other, t=0.0), base)
    close(M.slerp(base, other, t=1.0), other)
    # one angle per whole tensor, not per row: [[1, 0], [0, 1]] vs [[0, 1], [1, 0]] are orthogonal as vectors
    close(M.slerp({"k": jnp.eye(2)}, {"k": jnp.eye(2)[::-1]}, t=0.5), {"k": jnp.full((2, 2), s)})


def test_slerp_of_parallel_tensors_is_linear():
    base, other = {"w": arr(1, -2, 3)}, {"w": arr(3, -6, 9)}  # cos = 1 > DOT_THRESHOLD
    close(M.slerp(base, other, t=0.25), {"w": 0.75 * arr(1, -2, 3) + 0.25 * arr(3, -6, 9)})
    close(M.merge("slerp", [base, other], t=0.25), M.slerp(base, other, t=0.25))  # two models, no base


def test_model_stock_by_hand():
    base = {"w": arr(0, 0)}
    # deltas [1, 0] and [1, 1]: cos = 1 / sqrt 2, t = 2 cos / (1 + cos); the result is t * average
    c = 1 / np.sqrt(2)
    t = 2 * c / (1 + c)
    close(M.model_stock(base, [{"w": arr(1, 0)}, {"w": arr(1, 1)}]), {"w": t * arr(1, 0.5)})
    # opposite deltas: 1 + (N - 1) cos = 0 has no estimate, the base is kept
    close(M.model_stock(base, [{"w": arr(1, 2)}, {"w": arr(-1, -2)}]), base)


def test_model_stock_filter_wise_measures_angles_per_output_of_a_kernel():
    base = {"d": {"kernel": jnp.zeros((2, 2))}}  # (in, out): each column is one output's weights
    a, b = jnp.asarray([[1.0, 1.0], [0.0, 0.0]]), jnp.asarray([[1.0, -1.0], [0.0, 0.0]])
    merged = M.model_stock(base, [{"d": {"kernel": a}}, {"d": {"kernel": b}}], filter_wise=True)
    # column 0: identical deltas (cos 1, t 1) -> their average; column 1: opposite (singular) -> the base
    close(merged, {"d": {"kernel": jnp.asarray([[1.0, 0.0], [0.0, 0.0]])}})


def test_output_axis_is_torchs_leading_axis():
    assert M.output_axis("llama/layer_0/mlp/up/kernel", jnp.zeros((4, 8))) == -1
    assert M.output_axis("bert/word/embedding", jnp.zeros((50, 4))) == 0
    assert M.output_axis("gpt/layer_0/mlp/up/kernel", jnp.zeros((4, 8))) == 0  # GPT-2's Conv1D is (in, out)
    assert M.output_axis("classifier/bias", jnp.zeros(3)) == 0


# ---------------------------------------------------------------- properties and errors


@pytest.mark.parametrize("method,kwargs", [
    ("linear", {}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {"density": 1.0}),
    ("dare_linear", {"density": 1.0, "key": jax.random.key(0), "normalize": True}),
    ("dare_ties", {"density": 1.0, "key": jax.random.key(0), "normalize": True}),
])
def test_merging_copies_of_one_model_returns_it(method, kwargs):
    model = {"bert": {"w": arr(0.5, -2, 3)}, "classifier": {"b": arr(1, 2)}}
    base = {"bert": {"w": arr(0, 0, 1)}, "classifier": {"b": arr(0, 0)}}
    close(M.merge(method, [model] * 3, [0.2, 0.5, 0.3], base=base, **kwargs), model)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_sparse_merges_of_copies_of_base_return_base_at_any_density(method):
    kwargs = {"density": 0.5} | ({"key": jax.random.key(1)} if method.startswith("dare") else {})
    close(M.merge(method, [BASE] * 4, base=BASE, **kwargs), BASE)


def test_check_compatible_names_parameter_and_model():
    good = {"bert": {"layer_0": {"kernel": jnp.zeros((2, 2))}}}
    wide = {"bert": {"layer_0": {"kernel": jnp.zeros((2, 3))}}}
    with pytest.raises(JaxfoundError, match=r"'bert/layer_0/kernel' of ner has shape \(2, 3\), but cls has \(2, 2\)"):
        M.check_compatible([good, wide], ["cls", "ner"])
    with pytest.raises(JaxfoundError, match="model 1 has no parameter 'bert/layer_0/kernel'"):
        M.check_compatible([good, {"bert": {"layer_0": {}}}])
    with pytest.raises(JaxfoundError, match="'bert/layer_0/kernel' of model 1 has dtype bfloat16"):
        M.check_compatible([good, jax.tree.map(lambda x: x.astype(jnp.bfloat16), good)])
    with pytest.raises(JaxfoundError, match="model 1 has parameter 'bert/extra'"):
        M.check_compatible([good, {"bert": {**good["bert"], "extra": jnp.zeros(1)}}])


def test_merge_errors_name_the_argument():
    with pytest.raises(JaxfoundError, match="weights: got 2 for 3 models"):
        M.linear(MODELS, [1, 2])
    with pytest.raises(JaxfoundError, match=r"density must be a Python number in \(0, 1\]"):
        M.ties(BASE, MODELS, density=0.0)
    with pytest.raises(JaxfoundError, match="valid methods: linear, task_arithmetic"):
        M.merge("sce", MODELS)
    with pytest.raises(JaxfoundError, match="merge method 'ties' takes lam, normalize, rescale, density, key; got t"):
        M.merge("ties", MODELS, base=BASE, t=0.5)
    with pytest.raises(JaxfoundError, match="slerp interpolates two models"):
        M.merge("slerp", MODELS, base=BASE)
    with pytest.raises(JaxfoundError, match="'della' needs key="):
        M.merge("della", MODELS, base=BASE, density=0.5)
    with pytest.raises(JaxfoundError, match="epsilon < min"):
        M.merge("della", MODELS, base=BASE, density=0.1, epsilon=0.15, key=jax.random.key(0))
    with pytest.raises(JaxfoundError, match="needs base="):
        M.merge("ties", MODELS)


# ---------------------------------------------------------------- greedy soup


def test_greedy_soup_only_adds_models_that_do_not_hurt():
    candidates = [{"w": arr(0.8)}, {"w": arr(1.4)}, {"w": arr(3.0)}, {"w": arr(1.1)}]

    def score(p):  # best at w == 1
        return -abs(float(p["w"][0]) - 1.0)

    soup, chosen, history = M.greedy_soup(candidates, score)
    # order by own score: 1.1, 0.8, 1.4, 3.0; soup 1.1 -> (1.1+0.8)/2 = 0.95 (better) ->
    # with 1.4 the mean is 1.1 (worse), with 3.0 it is 1.633 (worse)
    assert chosen == [3, 0]
    np.testing.assert_allclose(history, [-0.1, -0.05, -0.05, -0.05], atol=1e-6)
    close(soup, {"w": arr(0.95)})


# ---------------------------------------------------------------- trunk and heads


def _bert(w, n_labels, fill):
    return {"bert": {"w": arr(*w)}, "classifier": {"kernel": jnp.full((3, n_labels), fill)}}


def test_split_trunk_separates_heads():
    key, trunk, heads = M.split_trunk(_bert([1, 2, 3], 2, 0.0))
    assert key == "bert" and set(trunk) == {"w"} and set(heads) == {"classifier"}
    with pytest.raises(JaxfoundError, match="exactly one trunk key.*'classifier'"):
        M.split_trunk({"classifier": {}})


def test_merge_trunk_averages_trunks_and_keeps_each_head():
    ner, cls = _bert([1, 2, 3], 5, 1.0), _bert([3, 4, 5], 2, 2.0)  # heads differ in shape
    merged_ner, merged_cls = M.merge_trunk("linear", [ner, cls], names=["ner", "cls"])
    close(merged_ner["bert"], {"w": arr(2, 3, 4)})
    assert merged_ner["bert"] is merged_cls["bert"]
    close(merged_ner["classifier"], ner["classifier"])
    close(merged_cls["classifier"], cls["classifier"])


def test_merge_trunk_task_arithmetic_uses_base_trunk():
    base = {"bert": {"w": arr(0, 0, 0)}, "transform": {"k": arr(9)}}
    out = M.merge_trunk("task_arithmetic", [_bert([1, 2, 3], 2, 0.0), _bert([1, 0, -1], 2, 0.0)], base=base)
    close(out[0]["bert"], {"w": arr(2, 2, 2)})


def test_merge_trunk_rejects_mixed_families():
    gpt = {"gpt": {"w": arr(1, 2, 3)}}
    with pytest.raises(JaxfoundError, match="model 1 has trunk 'gpt' but model 0 has 'bert'"):
        M.merge_trunk("linear", [_bert([1, 2, 3], 2, 0.0), gpt])


# ---------------------------------------------------------------- sharded, jitted


def test_jit_merges_on_sharded_pytree_match_eager():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    rng = np.random.default_rng(0)
    host = [{"bert": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}} for _ in range(4)]
    base, models = host[0], host[1:]
    put = partial(jax.device_put, device=sharding)
    s_base, s_models = jax.tree.map(put, base), [jax.tree.map(put, m) for m in models]
    assert len(s_base["bert"]["kernel"].sharding.device_set) == 8
    weights = jnp.asarray([0.5, 1.0, 1.5])
    key = jax.random.key(0)
    cases = [
        (partial(M.ties, density=0.5), {"weights": weights}),
        (partial(M.dare, density=0.5, combine="ties"), {"weights": weights, "key": key}),
        (M.task_arithmetic, {"weights": weights, "lam": 0.3}),
        (partial(M.della, density=0.5, epsilon=0.2), {"weights": weights, "key": key}),
        (lambda b, ms: M.slerp(b, ms[0], t=0.3), {}),
    ]
    eager_base, eager_models = jax.tree.map(jnp.asarray, base), [jax.tree.map(jnp.asarray, m) for m in models]
    for fn, kwargs in cases:
        out = jax.jit(fn)(s_base, s_models, **kwargs)
        assert len(out["bert"]["kernel"].sharding.device_set) == 8
        close(out, fn(eager_base, eager_models, **kwargs), atol=1e-5)
    soup = jax.jit(M.linear)(s_models, weights)
    close(soup, M.linear([jax.tree.map(jnp.asarray, m) for m in models], weights), atol=1e-6)
