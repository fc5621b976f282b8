"""Patient-level evaluation: splits, probes and intervals that count patients, not films.

Radiographs of one patient look alike, so a split, a fold or a bootstrap that draws films
instead of patients overstates what a test set can tell. Every piece here works by patient
(``groups``: the patient id of each film), with scikit-learn doing the standard parts:

* :func:`patient_split` — one fixed patient-disjoint split (``GroupShuffleSplit``) with
  ``test_fraction`` of the patients in test (0.3 by default: at least a quarter, so the test
  set holds enough patients to resample). The screening instrument uses it: one split keeps
  the CPU budget for more recipes; :func:`patient_folds` (``StratifiedGroupKFold``) gives
  patient-grouped folds to confirm the few best.
* :func:`fit_probe` — logistic regression on standardised features whose L2 strength is
  chosen by grouped cross-validation on the TRAINING patients (``GridSearchCV`` over
  :data:`C_GRID`, ``StratifiedGroupKFold``): no test patient informs any choice.
* :func:`knn_scores` — the k-nearest-neighbour readout (k = 20, cosine), the fraction of
  positive neighbours as the score.
* :func:`patient_resamples` / :func:`cluster_bootstrap` — the cluster bootstrap: each resample
  draws patients with replacement and keeps all films of each drawn patient, once per draw.
  Every encoder is scored on the same resamples, so a difference between two encoders is
  paired (the interval of the difference, not two intervals compared by eye).
* :func:`readout_features` — the readouts every encoder gets alike: mean-pooled final tokens
  (``mean``), and ``rich`` = [mean | the four 2x2-grid quadrant means | the means of the last
  four blocks' outputs]; raw pixels at the same size are the encoder-free baseline.
* :func:`label_fraction_draws` — 5 / 10 / 25 / 50 / 100 % of the training patients, several
  seeded draws (a smaller fraction is a subset of a larger one of the same draw).
* :func:`shortcut_targets` — what else the features read: mean brightness, sex, age, view
  position, each as a binary target cut at the training median, and a negative control
  (the primary labels permuted across training patients, balanced against the truth, in
  several draws: a probe must land at chance).

The AUROC of a resample is :func:`~spcl_fast.eval.metrics.bootstrap_mean_auroc`'s weighted
Mann-Whitney statistic, identical to recomputing the AUROC on the drawn films
(``tests/test_patient_eval.py`` checks it against that written-out reference).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .label_fraction import sample_patients
from .metrics import auroc, bootstrap_mean_auroc

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strengths tried (scikit-learn's C)
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
KNN_K = 20
TEST_FRACTION = 0.3
PERMUTATIONS = 5  # draws of the permuted-label control


def _groups(groups) -> np.ndarray:
    return np.asarray([str(g) for g in groups], dtype=object)


def patient_split(groups: Sequence, test_fraction: float = TEST_FRACTION, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` of one patient-disjoint split with ``test_fraction`` of the
    distinct patients in test (``GroupShuffleSplit``, so the fraction counts patients).

    Example::

        >>> tr, te = patient_split(["a", "a", "b", "c", "c", "d"], test_fraction=0.5)
        >>> sorted(tr.tolist() + te.tolist()), len({"aabccd"[i] for i in te})
        ([0, 1, 2, 3, 4, 5], 2)
    """
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = _groups(groups)
    split = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train, test = next(split.split(np.zeros(len(g)), groups=g))
    return np.sort(train), np.sort(test)


def patient_folds(groups: Sequence, labels: Sequence, n_folds: int = 5, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` patient-grouped folds, label-stratified (``StratifiedGroupKFold``):
    ``[(train_idx, test_idx), ...]``, every patient in exactly one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    g = _groups(groups)
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b))
            for a, b in folds.split(np.zeros(len(g)), np.asarray(labels), groups=g)]


def fit_probe(x: np.ndarray, y: np.ndarray, groups: Sequence, c_grid: Sequence[float] = C_GRID,
              inner_folds: int = 3, seed: int = 0):
    """A logistic-regression probe on standardised ``x`` for binary ``y``, its ``C`` chosen
    by AUROC over ``inner_folds`` patient-grouped folds of these (training) films.

    Fewer patients of a class than ``inner_folds`` (a small label fraction) lowers the number
    of folds to that count; with one patient of a class no choice can be made and the middle
    of the grid is used. Returns the fitted scikit-learn pipeline (``.predict_proba``) with
    ``chosen_c`` set on it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int)
    g = _groups(groups)
    if len(np.unique(y)) != 2:
        raise ValueError(f"a probe needs both classes among its training films, got {set(y)}")
    per_class = min(len(set(g[y == c])) for c in (0, 1))
    folds = min(inner_folds, per_class)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, tol=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs at the weakest L2 may stop before convergence
        if folds < 2:
            chosen = c_grid[len(c_grid) // 2]
            probe.set_params(logisticregression__C=chosen).fit(x, y)
        else:
            cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            search = GridSearchCV(probe, {"logisticregression__C": list(c_grid)},
                                  scoring="roc_auc", cv=cv, error_score=np.nan)
            search.fit(x, y, groups=g)
            probe, chosen = search.best_estimator_, search.best_params_["logisticregression__C"]
    probe.chosen_c = float(chosen)
    return probe


def probe_scores(x_train, y_train, groups_train, x_test, **kwargs) -> tuple[np.ndarray, float]:
    """Test-film scores of :func:`fit_probe` trained on the training films, and its ``C``."""
    probe = fit_probe(x_train, y_train, groups_train, **kwargs)
    return probe.predict_proba(x_test)[:, 1], probe.chosen_c


def knn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               k: int = KNN_K) -> np.ndarray:
    """The fraction of positives among each test film's ``k`` nearest training films by
    cosine distance (fewer when there are fewer training films)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric="cosine")
    knn.fit(x_train, np.asarray(y_train).astype(int))
    return knn.predict_proba(x_test)[:, list(knn.classes_).index(1)]


# --------------------------------------------------------------------------- features


@torch.no_grad()
def readout_features(encoder: nn.Module, images: torch.Tensor,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     batch_size: int = 256, device: torch.device | str | None = None
                     ) -> dict[str, np.ndarray]:
    """The readouts of a :class:`~spcl_fast.nn.VisionTransformer` on ``images (n, 1, S, S)``:
    ``mean`` (the mean of the final-normed patch tokens, ``(n, D)``) and ``rich``
    (``(n, 9D)`` for depth >= 4: [mean | the 2x2 grid's quadrant means of the final tokens |
    the patch-token means of the last four blocks' outputs]), float32 numpy.

    Example::

        >>> from spcl_fast.nn import vit_tiny_patch16
        >>> enc = vit_tiny_patch16(img_size=32, patch_size=8, depth=4)
        >>> f = readout_features(enc, torch.rand(3, 1, 32, 32))
        >>> f["mean"].shape, f["rich"].shape
        ((3, 192), (3, 1728))
    """
    was_training = encoder.training
    encoder.eval()
    prefix = encoder.num_prefix_tokens
    grid = encoder.patch_embed.grid_size
    device = device or next(encoder.parameters()).device
    means, richs = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        x = transform(x) if transform is not None else x
        tokens = encoder.embed(x)
        if prefix:
            tokens = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        block_means = []
        for blk in encoder.blocks:
            tokens = blk(tokens)
            block_means.append(tokens[:, prefix:].mean(1))
        final = encoder.norm(tokens)[:, prefix:]
        mean = final.mean(1)
        quads = F.adaptive_avg_pool2d(final.transpose(1, 2).reshape(x.shape[0], -1, grid, grid),
                                      2).flatten(2).transpose(1, 2).flatten(1)
        means.append(mean.float().cpu())
        richs.append(torch.cat([mean, quads, *block_means[-4:]], 1).float().cpu())
    encoder.train(was_training)
    return {"mean": torch.cat(means).numpy(), "rich": torch.cat(richs).numpy()}


def pixel_features(images: torch.Tensor,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> np.ndarray:
    """Raw pixels (normalised like the encoders' input), ``(n, S * S)`` float32 numpy."""
    x = transform(images) if transform is not None else images
    return x.flatten(1).float().cpu().numpy()


# --------------------------------------------------------------------------- bootstrap


def patient_resamples(groups: Sequence, resamples: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cluster bootstrap's draws: ``(patients, draws, counts)``.

    ``patients`` are the sorted distinct ids; ``draws`` ``(B, P)`` the indices into them of
    the patients drawn (with replacement) for each of the ``B`` resamples; ``counts``
    ``(B, n)`` float64 how often each film enters a resample (its patient's draw count).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    g = _groups(groups)
    patients, of_film = np.unique(g, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(patients), size=(resamples, len(patients)))
    per_patient = np.zeros((resamples, len(patients)))
    np.add.at(per_patient, (np.arange(resamples)[:, None], draws), 1.0)
    return patients, draws, per_patient[:, of_film]


def resampled_aurocs(scores: dict[str, np.ndarray], labels: np.ndarray, groups: Sequence,
                     resamples: int = 2000, seed: int = 0
                     ) -> tuple[dict[str, float], dict[str, np.ndarray], int]:
    """The AUROC of each ``(n,)`` score vector on all test films and on each patient resample
    (:func:`patient_resamples`, the same for every vector): ``(values, samples, patients)``,
    ``samples[name]`` ``(B,)`` with NaN where a resample drew one class only."""
    names = list(scores)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 1 or any(np.shape(scores[k]) != labels.shape for k in names):
        raise ValueError(f"scores and labels must all be (n,) for the same films; got labels "
                         f"{labels.shape} and {[np.shape(scores[k]) for k in names]}")
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} patient ids for {len(labels)} films")
    patients, _, counts = patient_resamples(groups, resamples, seed)
    y = torch.as_tensor(labels)
    mats = [torch.as_tensor(np.asarray(scores[k], dtype=np.float64)) for k in names]
    drawn = bootstrap_mean_auroc([m[:, None] for m in mats], y[:, None],
                                 torch.as_tensor(counts)).numpy()
    values = {k: auroc(m, y) for k, m in zip(names, mats, strict=True)}
    return values, dict(zip(names, drawn, strict=True)), len(patients)


def summarise(values: dict[str, float], samples: dict[str, np.ndarray],
              pairs: Sequence[tuple[str, str]] = (), level: float = 0.95) -> dict:
    """Percentile intervals of :func:`resampled_aurocs`'s output (or of averages of several
    such outputs over draws, on the same resamples): ``{"auroc": {name: {"value", "low",
    "high"}}, "difference": {"a - b": {"value", "low", "high", "p_not_above"}},
    "resamples"}``. Resamples where any AUROC is undefined are left out, for all alike."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    for a, b in pairs:
        if a not in samples or b not in samples:
            raise ValueError(f"pair ({a!r}, {b!r}) names scores not given ({list(samples)})")
    ok = ~np.isnan(np.stack(list(samples.values()))).any(0)
    tail = (1 - level) / 2

    def entry(value, drawn):
        low, high = np.quantile(drawn[ok], [tail, 1 - tail])
        return {"value": float(value), "low": float(low), "high": float(high)}

    out = {"auroc": {k: entry(values[k], samples[k]) for k in samples}, "difference": {},
           "resamples": int(ok.sum()), "level": level}
    for a, b in pairs:
        diff = samples[a] - samples[b]
        out["difference"][f"{a} - {b}"] = {**entry(values[a] - values[b], diff),
                                           "p_not_above": float((diff[ok] <= 0).mean())}
    return out


def cluster_bootstrap(scores: dict[str, np.ndarray], labels: np.ndarray, groups: Sequence,
                      pairs: Sequence[tuple[str, str]] = (), resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
    """AUROC of each score vector with its patient-level interval, and the paired difference
    of each ``(a, b)`` in ``pairs`` with its interval, all on the same patient resamples
    (:func:`resampled_aurocs`, then :func:`summarise`; ``films`` and ``patients`` added).

    Example::

        >>> y = np.array([0, 1] * 20); pid = np.repeat(np.arange(20), 2)
        >>> res = cluster_bootstrap({"good": y + 0.1 * np.arange(40) % 1.5,
        ...                          "noise": np.arange(40) % 7}, y, pid,
        ...                         pairs=[("good", "noise")], resamples=200)
        >>> res["auroc"]["good"]["value"] > 0.9, res["difference"]["good - noise"]["low"] > 0
        (True, True)
    """
    values, samples, patients = resampled_aurocs(scores, labels, groups, resamples, seed)
    return {**summarise(values, samples, pairs, level), "films": len(labels),
            "patients": patients}


# --------------------------------------------------------------------------- label fractions


def label_fraction_draws(groups: Sequence, fractions: Sequence[float] = FRACTIONS,
                         draws: int = 3, seed: int = 0) -> dict[tuple[float, int], np.ndarray]:
    """``{(fraction, draw): indices}`` of the films of a seeded sample of ``fraction`` of the
    distinct patients (:func:`~spcl_fast.eval.label_fraction.sample_patients`; draw ``d``
    uses seed ``seed + d``, and the full set is one draw)."""
    pids = [str(g) for g in groups]
    out = {}
    for fraction in fractions:
        for d in range(1 if fraction == 1 else draws):
            out[(fraction, d)] = sample_patients(pids, fraction, seed + d).numpy()
    return out


# --------------------------------------------------------------------------- shortcuts


def shortcut_targets(images: np.ndarray | torch.Tensor, train_idx: np.ndarray,
                     labels: np.ndarray, groups: Sequence, sexes: Sequence[str] | None = None,
                     ages: Sequence[float] | None = None,
                     views: Sequence[str] | None = None, seed: int = 0,
                     permutations: int = PERMUTATIONS) -> dict[str, np.ndarray]:
    """Binary targets besides disease, for every film: ``brightness`` (the film's mean pixel
    above the training films' median), ``sex`` (M), ``age`` (above the training median),
    ``view`` (AP), where given, and the negative control ``permuted/<d>`` for ``d`` below
    ``permutations``: the training films carry :func:`balanced_permutation`'s labels, the
    test films their own, so a probe trained on it must score the test films at chance."""
    images = torch.as_tensor(images)
    brightness = images.flatten(1).float().mean(1).numpy()
    out = {"brightness": (brightness > np.median(brightness[train_idx])).astype(int)}
    if sexes is not None:
        out["sex"] = (np.asarray(sexes) == "M").astype(int)
    if ages is not None:
        age = np.asarray(ages, dtype=np.float64)
        out["age"] = (age > np.median(age[train_idx])).astype(int)
    if views is not None:
        out["view"] = (np.asarray(views) == "AP").astype(int)
    for d in range(permutations):
        out[f"permuted/{d}"] = balanced_permutation(labels, groups, train_idx, seed + d)
    return out


def balanced_permutation(labels: np.ndarray, groups: Sequence, train_idx: np.ndarray,
                         seed: int = 0) -> np.ndarray:
    """``labels`` with each training patient's films relabelled by a permutation of the
    training patients' labels (a patient's label: its first film's) that gives the same share
    of positives among the truly positive and the truly negative patients (to rounding).

    A plain permutation correlates with the truth by chance, and a probe on features that
    read the disease well turns that small correlation into a test AUROC far from 0.5 (on the
    pediatric films one plain permutation read well below chance for every encoder);
    balanced, the new labels carry no information about the truth. Test films keep their
    labels."""
    g = _groups(groups)
    patients = np.unique(g[train_idx])
    first = np.asarray([labels[np.flatnonzero(g == p)[0]] for p in patients]).astype(int)
    positive, negative = patients[first == 1], patients[first == 0]
    rng = np.random.default_rng(seed)
    share = len(positive) / len(patients)
    stay = int(round(share * len(positive)))  # positives that stay positive
    chosen = np.concatenate([rng.choice(positive, stay, replace=False),
                             rng.choice(negative, len(positive) - stay, replace=False)])
    out = np.asarray(labels).astype(int).copy()
    out[train_idx] = np.isin(g[train_idx], chosen).astype(int)
    return out


def fmt_interval(entry: dict, signed: bool = False) -> str:
    """``0.712 [0.671, 0.750]`` (``+0.031 [-0.004, +0.066]`` when ``signed``)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    value = entry["value"]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{f.format(value)} [{f.format(entry['low'])}, {f.format(entry['high'])}]"
