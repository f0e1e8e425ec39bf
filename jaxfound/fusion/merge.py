"""Model merging over parameter pytrees: linear soups, task arithmetic, TIES, DARE, Breadcrumbs, DELLA, SLERP,
Model Stock, greedy soups.

Every merge is a pure function of plain nested dicts of arrays: it runs eagerly or under `jax.jit`
on sharded arrays without moving them to the host. Hyper-parameters that shape the computation
(`density`, `gamma`, `epsilon`, `normalize`, `rescale`) are Python values; bind them with `functools.partial`
before jitting. The semantics are mergekit's (0.1.5: generalized_task_arithmetic.py, sparsify.py, slerp.py,
model_stock.py; tests/test_mergekit_parity.py compares outputs): per-tensor sparsification, weights applied to the
task vectors before sign election, `normalize` dividing by the summed weights of the entries kept, and angles
measured per output row in torch's layout (`output_axis`) where mergekit does so (Model Stock's filter_wise, DELLA's
ranks; SLERP takes one angle per whole tensor). Coefficients may be functions of the parameter path, which is how
recipes give per-layer gradients and filters. One known difference: GPT-2's fused c_attn is three tensors here
(query, key, value), so per-tensor statistics (SLERP's angle, TIES' top-k, rescale norms) of GPT-2's attention input
projection differ from mergekit's.
"""

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import aligned, interpolation, sparsify
from jaxfound.fusion.aligned import Params, check_compatible, output_axis
from jaxfound.models import TRUNK_KEYS

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "slerp", "model_stock")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")


# ---------------------------------------------------------------- linear and task arithmetic


def linear(trees: Sequence[Params], weights=None, normalize: bool = True) -> Params:
    """Weighted average of models (a model soup): sum_i w_i theta_i, divided by sum_i w_i when normalize.

    weights: one per model, or a function of the parameter path returning them."""
    aligned.weights_vector(weights if not callable(weights) else None, len(trees))

    def leaf(_i, path, _base, leaves):
        flat = tuple(x.reshape(-1) for x in leaves)
        mixed = _linear_tensor(flat, aligned.weights_vector(aligned.at(weights, path), len(trees)), normalize=normalize)
        return mixed.reshape(np.shape(leaves[0]))

    return aligned.map_leaves(leaf, None, trees)


# Per-tensor kernels are jitted: eager jax would compile every primitive for every new shape; these compile once per
# (shape, static hyper-parameters) and are reused across leaves, layers and merges. Where the layout does not matter
# they see tensors flattened, so tensors of one size share a kernel.
@partial(jax.jit, static_argnames=("normalize",))
def _linear_tensor(leaves, w_N, *, normalize: bool):
    x_NxS = jnp.stack([x.astype(aligned.compute_dtype(x.dtype)) for x in leaves])
    mixed = (aligned.broadcast(w_N, x_NxS) * x_NxS).sum(0)
    if normalize:
        total = w_N.sum()
        mixed = mixed / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
    return mixed.astype(leaves[0].dtype)


def task_vectors(base: Params, trees: Sequence[Params]) -> list[Params]:
    """tau_i = theta_i - theta_base for each model, in f32 (or wider) so small deltas survive."""
    check_compatible([base, *trees], ["base"] + [f"model {i}" for i in range(len(trees))])
    def delta(x, b):
        dtype = aligned.compute_dtype(b.dtype)
        return x.astype(dtype) - b.astype(dtype)

    return [jax.tree.map(delta, t, base) for t in trees]


def _combine(deltas_NxS, w_N, consensus, normalize):
    """mergekit's mixing step: weight, optionally elect a sign per entry, sum, optionally normalise.

    consensus and normalize may be traced booleans (one compiled kernel serves TIES and its relatives)."""
    w = aligned.broadcast(w_N, deltas_NxS)
    weighted = deltas_NxS * w
    # TIES sign election by summed (weighted) mass; a zero sum elects +
    majority = jnp.where(weighted.sum(0) >= 0, 1.0, -1.0).astype(weighted.dtype)
    agree = jnp.sign(weighted) == majority  # trimmed (zero) entries never agree, so they leave the mean
    elected = jnp.where(agree, weighted, 0).sum(0)
    elected_divisor = jnp.where(agree, w, 0).sum(0)
    elected_divisor = jnp.where(elected_divisor == 0, 1.0, elected_divisor)
    total = w_N.sum().astype(weighted.dtype)
    total = jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
    mixed = jnp.where(consensus, elected, weighted.sum(0))
    divisor = jnp.where(consensus, elected_divisor, total)
    return jnp.where(normalize, mixed / divisor, mixed)


# ---------------------------------------------------------------- sparsified task arithmetic (TIES, DARE, ...)

# mergekit's generalized task arithmetic family: method -> (sparsification, sign consensus, normalize, rescale)
TASK_ARITHMETIC_FAMILY = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("bernoulli", False, False, True),
    "dare_ties": ("bernoulli", True, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("magprune", True, True, True),
    "della_linear": ("magprune", False, False, True),
}
GAMMA, EPSILON = 0.01, 0.15  # mergekit's defaults for breadcrumbs' outlier fraction and DELLA's probability spread
_SPARSE_KWARGS = ("lam", "normalize", "rescale", "density", "key")
METHOD_KWARGS = {"linear": ("normalize",), "slerp": ("t",), "model_stock": ("filter_wise",),
                 "task_arithmetic": ("lam", "normalize", "rescale", "density"),  # density: mergekit takes it, unused
                 **{m: _SPARSE_KWARGS for m in ("ties", "dare_linear", "dare_ties")},
                 **{m: _SPARSE_KWARGS + ("gamma",) for m in ("breadcrumbs", "breadcrumbs_ties")},
                 **{m: _SPARSE_KWARGS + ("epsilon",) for m in ("della", "della_linear")}}


def _sparsify(tau, sparsification, window, prob, eps, rescale, key, row_axis):
    """One task vector sparsified as mergekit's sparsify(): window (kept ranks by |tau|) for the deterministic masks,
    prob / eps for the random ones (all may be traced)."""
    if sparsification == "rank":  # magnitude (TIES) and outliers (Breadcrumbs) keep a window of ranks
        mask = sparsify.rank_window_mask(tau, window[0], window[1])
    elif sparsification == "bernoulli":
        mask = sparsify.bernoulli_mask(tau, prob, key)
    else:
        mask = sparsify.magprune_mask(tau, prob, eps, key, row_axis)
    return sparsify.apply_mask(tau, mask, rescale)


def _sparsity_args(sparsification, size: int, densities, gammas, epsilons):
    """(which models are sparsified, kept-rank windows Nx2, keep probabilities N, epsilons N): Python values checked
    and turned into arrays, so one compiled kernel serves every density."""
    active = tuple(sparsification is not None and d < 1.0 for d in densities)
    windows = []
    for d, g, e in zip(densities, gammas, epsilons):
        if sparsification == "magprune" and d < 1.0:
            sparsify.check_magprune(d, e)
        windows.append(sparsify.outlier_window(size, d, g) if sparsification == "outliers" else
                       sparsify.magnitude_window(size, d))
    return (active, jnp.asarray(windows, jnp.int32).reshape(-1, 2), jnp.asarray(densities, jnp.float32),
            jnp.asarray(epsilons, jnp.float32))


@partial(jax.jit, static_argnames=("sparsification", "active", "row_axis"))
def _task_arithmetic_tensor(base, leaves, w_N, lam, key, windows_Nx2, probs_N, eps_N, consensus, normalize, rescale,
                            *, sparsification, active, row_axis):
    deltas = aligned.deltas(base, leaves)
    sparse = jnp.stack([
        _sparsify(t, sparsification, windows_Nx2[i], probs_N[i], eps_N[i], rescale,
                  jax.random.fold_in(key, i) if key is not None else None, row_axis) if active[i] else t
        for i, t in enumerate(deltas)])
    mixed = _combine(sparse, w_N, consensus=consensus, normalize=normalize)
    return (base.astype(mixed.dtype) + lam * mixed).astype(base.dtype)


def generalized_task_arithmetic(base: Params, trees: Sequence[Params], weights=None, *, sparsification=None,
                                consensus: bool = False, density=1.0, gamma=GAMMA, epsilon=EPSILON,
                                rescale: bool = False, lam=1.0, normalize: bool = False, key=None) -> Params:
    """theta_base + lam * mix_i(w_i * sparsify(tau_i)), mergekit's generalized task arithmetic, per tensor.

    sparsification: None, 'magnitude' (TIES), 'outliers' (Breadcrumbs), 'bernoulli' (DARE), 'magprune' (DELLA).
    consensus: elect a sign per entry by summed weighted mass and keep only the agreeing entries (TIES).
    normalize: divide by the summed weights (of the agreeing entries, with consensus).
    rescale: scale the kept entries so each task vector keeps its L1 norm.
    weights, density, gamma, epsilon, lam may be functions of the parameter path ('llama/layer_3/mlp/up/kernel')
    returning the value for that tensor (mergekit's per-layer gradients and filters); density, gamma and epsilon
    are one Python float or one per model. The random mask of model i on leaf j uses fold_in(fold_in(key, j), i).
    """
    if sparsification not in (None, "magnitude", "outliers", "bernoulli", "magprune"):
        raise JaxfoundError(f"sparsification: got {sparsification!r}; valid: None, 'magnitude', 'outliers', "
                            "'bernoulli', 'magprune'")
    if sparsification in ("bernoulli", "magprune") and key is None:
        raise JaxfoundError(f"{sparsification} sparsification needs key=jax.random.key(seed): its masks are random")
    n = len(trees)
    aligned.weights_vector(weights if not callable(weights) else None, n)  # a fixed list is checked before any work

    def leaf(j, path, b, leaves):
        active, windows, probs, eps = _sparsity_args(
            sparsification, int(np.size(b)), aligned.densities_per_model(aligned.at(density, path), n),
            aligned.per_model(aligned.at(gamma, path), n, "gamma", 0.0, 1.0),
            aligned.per_model(aligned.at(epsilon, path), n, "epsilon", 0.0, 1.0))
        kind = sparsification if any(active) else None  # static arguments only where they change the computation
        by_rows = kind == "magprune"  # the only sparsification that depends on the layout
        shape = np.shape(b)
        merged = _task_arithmetic_tensor(
            b if by_rows else b.reshape(-1), tuple(x if by_rows else x.reshape(-1) for x in leaves),
            aligned.weights_vector(aligned.at(weights, path), n), jnp.asarray(aligned.at(lam, path), jnp.float32),
            jax.random.fold_in(key, j) if kind in ("bernoulli", "magprune") else None, windows, probs, eps,
            jnp.asarray(consensus), jnp.asarray(normalize), jnp.asarray(rescale),
            sparsification="rank" if kind in ("magnitude", "outliers") else kind, active=active,
            row_axis=output_axis(path, b) if by_rows else 0)
        return merged.reshape(shape)

    return aligned.map_leaves(leaf, base, trees)


def task_arithmetic(base: Params, trees: Sequence[Params], weights=None, lam=1.0, normalize: bool = False) -> Params:
    """theta_base + lam * sum_i w_i tau_i (divided by sum_i w_i when normalize)."""
    return generalized_task_arithmetic(base, trees, weights, lam=lam, normalize=normalize)


def ties(base: Params, trees: Sequence[Params], weights=None, density=1.0, lam=1.0, normalize: bool = True,
         rescale: bool = False) -> Params:
    """TIES-merging: trim each task vector per tensor to its top density fraction, elect signs, disjoint mean.

    density: one float or one per model. With normalize (mergekit's default for `ties`) each entry is
    divided by the summed weights of the models whose trimmed, weighted delta agrees with the elected sign.
    """
    return generalized_task_arithmetic(base, trees, weights, sparsification="magnitude", consensus=True,
                                       density=density, lam=lam, normalize=normalize, rescale=rescale)


def drop_and_rescale(tau, density: float, key, rescale: bool = True):
    """DARE on one tensor: keep each entry with probability density, then (rescale) restore the L1 norm."""
    if density >= 1.0:
        return tau
    return sparsify.apply_mask(tau, sparsify.bernoulli_mask(tau, density, key), rescale)


def dare(base: Params, trees: Sequence[Params], weights=None, density=1.0, key=None, combine: str = "linear",
         lam=1.0, normalize: bool = False, rescale: bool = True) -> Params:
    """DARE (drop rate 1 - density) then a task-arithmetic ('linear') or TIES ('ties') combine.

    rescale (mergekit's default) scales each dropped task vector back to its L1 norm, which is DARE's 1 / density
    in expectation. The mask of model i on leaf j uses fold_in(fold_in(key, j), i), so it is fixed by (key, tree
    layout). normalize defaults to False as in mergekit's `dare_linear` and `dare_ties`.
    """
    if combine not in ("linear", "ties"):
        raise JaxfoundError(f"combine: got {combine!r}; valid values are 'linear' and 'ties'")
    if key is None:
        raise JaxfoundError("dare needs key=jax.random.key(seed): the dropped entries are random")
    return generalized_task_arithmetic(base, trees, weights, sparsification="bernoulli", consensus=combine == "ties",
                                       density=density, lam=lam, normalize=normalize, rescale=rescale, key=key)


def breadcrumbs(base: Params, trees: Sequence[Params], weights=None, density=1.0, gamma=GAMMA, combine="linear",
                lam=1.0, normalize: bool = False, rescale: bool = False) -> Params:
    """Model Breadcrumbs: per tensor, drop the gamma fraction of largest |tau| (outliers) and the smallest, keeping a
    density fraction; then a task-arithmetic ('linear') or TIES ('ties', mergekit's breadcrumbs_ties) combine."""
    if combine not in ("linear", "ties"):
        raise JaxfoundError(f"combine: got {combine!r}; valid values are 'linear' and 'ties'")
    return generalized_task_arithmetic(base, trees, weights, sparsification="outliers", consensus=combine == "ties",
                                       density=density, gamma=gamma, lam=lam, normalize=normalize, rescale=rescale)


def della(base: Params, trees: Sequence[Params], weights=None, density=1.0, epsilon=EPSILON, key=None,
          combine="ties", lam=1.0, normalize: bool | None = None, rescale: bool = True) -> Params:
    """DELLA (MAGPRUNE): within each output row, keep an entry with probability from density - epsilon to
    density + epsilon by the rank of its |tau|, restore each task vector's L1 norm (rescale), then a TIES ('ties',
    mergekit's della) or task-arithmetic ('linear', della_linear) combine. normalize defaults as in mergekit: on for
    della, off for della_linear."""
    if combine not in ("linear", "ties"):
        raise JaxfoundError(f"combine: got {combine!r}; valid values are 'linear' and 'ties'")
    if key is None:
        raise JaxfoundError("della needs key=jax.random.key(seed): the dropped entries are random")
    normalize = combine == "ties" if normalize is None else normalize
    return generalized_task_arithmetic(base, trees, weights, sparsification="magprune", consensus=combine == "ties",
                                       density=density, epsilon=epsilon, lam=lam, normalize=normalize,
                                       rescale=rescale, key=key)


# ---------------------------------------------------------------- SLERP and Model Stock


def slerp(base: Params, other: Params, t=0.5) -> Params:
    """SLERP from base (t = 0) to other (t = 1), each tensor flattened to one vector as mergekit's `slerp`.

    t: a float or a function of the parameter path (per-layer gradients, filters). Tensors that are (anti)parallel
    interpolate linearly (interpolation.DOT_THRESHOLD).
    """
    def leaf(_i, path, b, leaves):
        t_here = jnp.asarray(aligned.at(t, path), jnp.float32)
        return _slerp_tensor(t_here, b.reshape(-1), leaves[0].reshape(-1)).reshape(np.shape(b))

    return aligned.map_leaves(leaf, base, [other])


def model_stock(base: Params, trees: Sequence[Params], filter_wise: bool = False) -> Params:
    """Model Stock: per tensor (per output row when filter_wise) move from base towards the models' average by the
    ratio their pairwise angle implies; needs >= 2 models besides the base."""
    if len(trees) < 2:
        raise JaxfoundError(f"model_stock needs at least 2 models besides the base, got {len(trees)}")

    def leaf(_i, path, b, leaves):
        if filter_wise:
            return _model_stock_tensor(b, tuple(leaves), filter_wise=True, row_axis=output_axis(path, b))
        flat = _model_stock_tensor(b.reshape(-1), tuple(x.reshape(-1) for x in leaves), filter_wise=False, row_axis=0)
        return flat.reshape(np.shape(b))

    return aligned.map_leaves(leaf, base, trees)


_slerp_tensor = jax.jit(interpolation.slerp)
_model_stock_tensor = jax.jit(interpolation.model_stock, static_argnames=("filter_wise", "row_axis"))


def merge(method: str, trees: Sequence[Params], weights=None, *, base: Params | None = None, **kwargs) -> Params:
    """Dispatch by mergekit method name (METHODS) with mergekit's defaults for normalize and rescale.

    slerp: base and one model (or two models and no base: the first is t = 0); slerp and model_stock take no
    weights (mergekit has none) and ignore them. Random methods (dare_*, della*) need key=.
    """
    if method not in METHODS:
        raise JaxfoundError(f"merge method {method!r} is unknown; valid methods: {', '.join(METHODS)}")
    unknown = [k for k in kwargs if k not in METHOD_KWARGS[method]]
    if unknown:
        raise JaxfoundError(f"merge method {method!r} takes {', '.join(METHOD_KWARGS[method])}; "
                            f"got {', '.join(unknown)}")
    if method == "linear":
        return linear(trees, weights, **kwargs)
    if method == "slerp":
        if base is None and len(trees) == 2:
            base, trees = trees[0], trees[1:]
        if base is None or len(trees) != 1:
            raise JaxfoundError(f"slerp interpolates two models: give base= and one model, or two models; got "
                                f"{len(trees)} model(s) {'with' if base is not None else 'without'} a base")
        return slerp(base, trees[0], **kwargs)
    if base is None:
        raise JaxfoundError(f"merge method {method!r} needs base= (the model the task vectors are taken from)")
    if method == "model_stock":
        return model_stock(base, trees, **kwargs)
    sparsification, consensus, normalize, rescale = TASK_ARITHMETIC_FAMILY[method]
    if sparsification in ("bernoulli", "magprune") and kwargs.get("key") is None:
        raise JaxfoundError(f"merge method {method!r} needs key=jax.random.key(seed): its masks are random")
    kwargs = {"normalize": normalize, "rescale": rescale} | kwargs
    return generalized_task_arithmetic(base, trees, weights, sparsification=sparsification, consensus=consensus,
                                       **kwargs)


# ---------------------------------------------------------------- soups


def greedy_soup(candidates: Sequence[Params], score_fn: Callable[[Params], float]):
    """Greedy soup (Wortsman et al. 2022): visit candidates best-first, keep one if the uniform average still scores.

    score_fn maps params to a held-out score (higher is better); a candidate joins when the soup's score
    does not drop (>=). Returns (params, chosen candidate indices, soup score after each visit).
    """
    if not candidates:
        raise JaxfoundError("greedy_soup: the list of candidates is empty")
    check_compatible(candidates)
    own = [float(score_fn(c)) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -own[i])
    chosen, soup, best = [order[0]], candidates[order[0]], own[order[0]]
    history = [best]
    for i in order[1:]:
        trial = linear([candidates[j] for j in chosen + [i]])
        score = float(score_fn(trial))
        if score >= best:
            chosen, soup, best = chosen + [i], trial, score
        history.append(best)
    return soup, chosen, history


# ---------------------------------------------------------------- trunk and heads


def split_trunk(params: Params) -> tuple[str, Params, dict]:
    """(trunk key, trunk subtree, task heads): the trunk is params['bert'] or params['gpt']."""
    found = [k for k in TRUNK_KEYS if k in params]
    if len(found) != 1:
        raise JaxfoundError(
            f"params must hold exactly one trunk key out of {TRUNK_KEYS}; found {found or 'none'} "
            f"among top-level keys {sorted(params)}"
        )
    key = found[0]
    return key, params[key], {k: v for k, v in params.items() if k != key}


def merge_trunk(method: str, models: Sequence[Params], weights=None, *, base: Params | None = None,
                names: Sequence[str] | None = None, **kwargs) -> list[dict]:
    """Merge only the trunks of task models; return one params dict per model: the shared trunk with its own heads.

    Heads (classifier, pooler, ...) differ in shape between tasks, so they are never averaged.
    """
    if not models:
        raise JaxfoundError("merge_trunk: the list of models is empty")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    split = [split_trunk(m) for m in models]
    key = split[0][0]
    for name, (k, _, _) in zip(names, split):
        if k != key:
            raise JaxfoundError(f"{name} has trunk '{k}' but {names[0]} has '{key}'; merge one family at a time")
    trunks = [t for _, t, _ in split]
    check_compatible(trunks, names)
    base_trunk = None
    if base is not None:
        base_key, base_trunk, _ = split_trunk(base)
        if base_key != key:
            raise JaxfoundError(f"base has trunk '{base_key}' but the models have '{key}'")
    # merged under the trunk key, so coefficient functions and output_axis see full paths ('gpt/layer_0/...')
    merged = merge(method, [{key: t} for t in trunks], weights,
                   base={key: base_trunk} if base_trunk is not None else None, **kwargs)[key]
    return [{key: merged, **heads} for _, _, heads in split]
