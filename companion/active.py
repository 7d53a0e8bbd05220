"""Which pairs to ask people about: uncertainty sampling against random sampling.

Book: chapter 12, section "Which pairs to ask people about" (12c).

**The reward model.** A Bradley--Terry head on frozen features: ``phi(x, y)`` is the
chapter's :class:`companion.align.RewardModel` without its head -- the SFT model's final
hidden state at the answer's last token -- and the reward is ``r(x, y) = w . phi(x, y)``.
With the difference features ``d = phi(x, y_a) - phi(x, y_b)`` of a pair and the label
``z = 1`` when a person prefers ``y_a``, the Bradley--Terry likelihood is a logistic
regression without intercept; :func:`fit_bradley_terry` minimises

    L(w) = mean_i [log(1 + exp(-s_i d_i . w))] + (l2 / 2) ||w||^2,   s_i = 2 z_i - 1,

by Newton's method in float64 (convex: one optimum, whatever the start).

**Acquisition** (pool-based active learning, Settles 2009). Each round the current model
scores every unlabelled pair by its margin ``|r(y_a) - r(y_b)| = |d . w|`` -- no label
needed -- and :func:`select_uncertain` asks for the ``k`` pairs with the smallest margin
(uncertainty sampling); :func:`select_random` asks for ``k`` at random (the baseline).
:func:`active_learning_curve` runs the loop; :func:`labels_to_target` reads off the
number of labels at which held-out pairwise accuracy first reaches a target.

**The record.** :func:`record_runs` (``python -m companion.active --record``) writes
every curve of :func:`run_all` to :data:`RECORD`; the notebook recomputes the features,
the penalty's choice and the first rounds of seed 0 and compares them with it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from companion import align
from companion._validate import check_choice, check_float, check_int, check_tensor
from companion.records import load_record, record_main, write_record

#: Both strategies get the same budget -- a random seed set, then ``rounds``
#: rounds of ``batch`` labels, until the whole pool of 256 is labelled; one L2 strength
#: for every fit, chosen from ``l2_grid`` on the development pairs (:func:`choose_l2`).
#: The target is ``target_fraction`` of the accuracy with the whole pool labelled; the
#: flipped labels are counted among the first ``flip_window`` labels. The loop's own
#: draws (seed set, random queries) of run ``seed`` use ``loop_seed + seed``: the
#: labeller's flips use ``seed`` itself (:func:`pool_labels`), and the same generator
#: seed would draw the same permutation of the pool -- a seed set of flipped pairs only.
SETTINGS = {"seed_labels": 8, "batch": 8, "rounds": 31, "l2_grid": [1e-3, 1e-2, 1e-1],
            "target_fraction": 0.95, "noise": [0.0, 0.3], "seeds": [0, 1, 2, 3, 4],
            "start_seed": 0, "n_heldout": 192, "flip_window": 128, "loop_seed": 1000}
STRATEGIES = ("uncertainty", "random")


@torch.no_grad()
def pair_features(start: nn.Module, tokenizer, pairs: list[dict]) -> torch.Tensor:
    """``(n, C)`` float64: ``phi(chosen) - phi(rejected)`` of each pair, where
    ``phi`` is :class:`companion.align.RewardModel` on ``start`` without its head."""
    features = align.RewardModel(start)
    features.head = nn.Identity()  # forward now returns the (B, C) hidden states
    device = next(start.parameters()).device
    chosen = features(*align._pair_batch(pairs, tokenizer, "chosen", device))
    rejected = features(*align._pair_batch(pairs, tokenizer, "rejected", device))
    return (chosen - rejected).double().cpu()


def _check_xz(X, z) -> None:
    check_tensor("X", X, ndim=2, dtype=torch.float64)
    check_tensor("z", z, ndim=1)
    if len(z) != len(X) or not len(X):
        raise ValueError(f"z must hold one label per row of X ({len(X)} >= 1), got {len(z)}")
    if not torch.isfinite(X).all():
        raise ValueError("X must be finite")
    if not ((z == 0) | (z == 1)).all():
        raise ValueError("z must hold only 0 and 1")


def bradley_terry_objective(w, X, z, l2: float) -> torch.Tensor:
    """``L(w)``: the mean Bradley--Terry negative log-likelihood plus ``l2 / 2 ||w||^2``."""
    s = 2.0 * z.to(X) - 1.0  # (n,) +1: a preferred, -1: b preferred
    return torch.nn.functional.softplus(-s * (X @ w)).mean() + 0.5 * l2 * w @ w


def fit_bradley_terry(X, z, l2: float, steps: int = 50, tol: float = 1e-12):
    """``(C,)`` float64: the ``w`` minimising :func:`bradley_terry_objective` for pairs
    ``X (n, C)`` labelled ``z (n,)``: Newton's method from zero, each step halved until
    the objective does not increase; ``RuntimeError`` if ``steps`` do not converge."""
    _check_xz(X, z)
    l2 = check_float("l2", l2, low=0.0, low_open=True)
    check_int("steps", steps, low=1)
    s = 2.0 * z.to(X) - 1.0
    w = torch.zeros(X.size(1), dtype=torch.float64)
    eye = torch.eye(X.size(1), dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(-s * (X @ w))  # (n,) the probability of the wrong choice
        grad = -(X * (s * p)[:, None]).mean(0) + l2 * w
        hessian = (X * (p * (1 - p))[:, None]).T @ X / len(X) + l2 * eye
        step = torch.linalg.solve(hessian, grad)
        before = bradley_terry_objective(w, X, z, l2)
        while (bradley_terry_objective(w - step, X, z, l2) > before
               and step.abs().max() > tol):
            step = step / 2
        w = w - step
        if step.abs().max() < tol * (1 + w.abs().max()):
            return w
    raise RuntimeError(f"Newton's method did not converge in {steps} steps")


def pairwise_accuracy(X, w) -> float:
    """Fraction of pairs ``X (n, C)``, oriented preferred-first, with ``d . w > 0``
    (a tie counts as wrong)."""
    return (X @ w > 0).double().mean().item()


def _check_candidates(candidates, k: int, n: int | None = None) -> torch.Tensor:
    check_tensor("candidates", candidates, ndim=1, dtype=torch.long)
    check_int("k", k, low=1)
    if k > len(candidates):
        raise ValueError(f"k must be <= the {len(candidates)} candidates, got {k}")
    if n is not None and not (0 <= candidates.min() and candidates.max() < n):
        raise ValueError(f"candidates must index the {n} margins")
    return candidates


def select_uncertain(margins, candidates, k: int) -> torch.Tensor:
    """The ``k`` of ``candidates`` (indices into ``margins (n,)``) with the smallest
    ``|margin|``, most uncertain first; ties in candidate order."""
    check_tensor("margins", margins, ndim=1, floating=True)
    candidates = _check_candidates(candidates, k, len(margins))
    order = torch.argsort(margins[candidates].abs(), stable=True)
    return candidates[order[:k]]


def select_random(candidates, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of ``candidates`` drawn uniformly without replacement with ``generator``."""
    candidates = _check_candidates(candidates, k)
    return candidates[torch.randperm(len(candidates), generator=generator)[:k]]


def active_learning_curve(X_pool, z_pool, X_test, strategy: str, seed: int, l2: float,
                          seed_labels: int, batch: int, rounds: int) -> dict:
    """The pool-based loop: ``seed_labels`` random pairs of the pool are labelled, then
    each round fits :func:`fit_bradley_terry`, records its :func:`pairwise_accuracy` on
    ``X_test`` and asks for ``batch`` more labels with ``strategy``. Returns the labels
    after each fit, the accuracies and the queried indices in order."""
    _check_xz(X_pool, z_pool)
    check_choice("strategy", strategy, STRATEGIES)
    check_int("rounds", rounds, low=0)
    check_int("seed_labels", seed_labels, low=1)
    if seed_labels + rounds * check_int("batch", batch, low=1) > len(X_pool):
        raise ValueError(f"seed_labels + rounds * batch must be <= the pool's "
                         f"{len(X_pool)}")
    generator = torch.Generator().manual_seed(seed)
    queried = torch.randperm(len(X_pool), generator=generator)[:seed_labels]
    labels, accuracy = [], []
    for r in range(rounds + 1):
        w = fit_bradley_terry(X_pool[queried], z_pool[queried], l2)
        labels.append(len(queried))
        accuracy.append(pairwise_accuracy(X_test, w))
        if r == rounds:
            break
        unlabelled = torch.ones(len(X_pool), dtype=torch.bool)
        unlabelled[queried] = False
        candidates = unlabelled.nonzero().squeeze(1)
        if strategy == "uncertainty":
            new = select_uncertain(X_pool @ w, candidates, batch)
        else:
            new = select_random(candidates, batch, generator)
        queried = torch.cat([queried, new])
    return {"labels": labels, "accuracy": accuracy, "queried": queried.tolist()}


def labels_to_target(labels, accuracies, target: float) -> float:
    """The first number of labels whose accuracy is ``>= target``; ``math.inf`` if none
    is. ``labels`` must increase; NaN accuracies are refused."""
    target = check_float("target", target)
    labels, accuracies = list(labels), [float(a) for a in accuracies]
    if len(labels) != len(accuracies) or not labels:
        raise ValueError(f"labels and accuracies must be non-empty and of the same "
                         f"length, got {len(labels)} and {len(accuracies)}")
    if any(not math.isfinite(a) for a in accuracies):
        raise ValueError(f"accuracies must be finite, got {accuracies}")
    if any(b <= a for a, b in zip(labels, labels[1:])):
        raise ValueError(f"labels must increase, got {labels}")
    return next((float(n) for n, a in zip(labels, accuracies) if a >= target), math.inf)


def flipped_fraction(queried: list[int], z_pool, start: int, stop: int) -> float:
    """Fraction of the pairs ``queried[start:stop]`` whose label is flipped
    (``z == 0``: the labeller preferred the wrong answer)."""
    asked = torch.as_tensor(queried[start:stop], dtype=torch.long)
    if not len(asked):
        raise ValueError(f"queried[start:stop] must not be empty, got [{start}:{stop}]")
    return (z_pool[asked] == 0).double().mean().item()


# --------------------------------------------------------------------------- the data


def heldout_instructions(corpus, n: int) -> list[dict]:
    """``n`` held-out prompts on the test words; the first 48 are the chapter's test set
    (the same draw as :func:`companion.align.instruction_split`, continued)."""
    words = align.corpus_words(corpus.tokenizer.decode(corpus.train_ids.tolist()))[1::2]
    return align.make_instructions(words, n, seed=1)


def chapter_features(seed: int = SETTINGS["start_seed"], n_heldout=SETTINGS["n_heldout"]):
    """The frozen features of the chapter's SFT model of ``seed``
    (``align._start_model``) -- of the 256 preference prompts (the pool), the development
    and the held-out prompts, each pair oriented correct-first -- and the corpus."""
    start, corpus, _, test, prefs = align._start_model(seed)
    tok, heldout = corpus.tokenizer, heldout_instructions(corpus, n_heldout)
    if heldout[:len(test)] != test:
        raise RuntimeError("the held-out prompts must begin with the chapter's test set")

    def features(examples):
        return pair_features(start, tok, align.preference_pairs(examples, 0.0, 0))
    return {"pool": features(prefs), "dev": features(align.dev_instructions(corpus)),
            "heldout": features(heldout)}, corpus


def pool_labels(n: int, noise: float, seed: int) -> torch.Tensor:
    """``(n,)`` the labeller's answers on the pool: 1 (correct preferred) except on the
    pairs :func:`companion.align.flip_labels` flips -- the chapter's noisy labeller."""
    return (~align.flip_labels(n, noise, seed)).long()


def dev_accuracies(features: dict, grid=SETTINGS["l2_grid"]) -> list[float]:
    """Accuracy on the development pairs of the fit on all clean pool labels, per L2
    strength of ``grid``."""
    z = torch.ones(len(features["pool"]), dtype=torch.long)
    return [pairwise_accuracy(features["dev"], fit_bradley_terry(features["pool"], z, l2))
            for l2 in grid]


def choose_l2(features: dict, grid=SETTINGS["l2_grid"]) -> float:
    """The L2 strength of ``grid`` with the best :func:`dev_accuracies` (the first on a
    tie); shared by both strategies."""
    dev = dev_accuracies(features, grid)
    return grid[dev.index(max(dev))]


def run_curve(features: dict, noise: float, seed: int, strategy: str, l2: float,
              rounds: int | None = None, settings=SETTINGS) -> tuple[torch.Tensor, dict]:
    """The pool labels of run ``seed`` (:func:`pool_labels`) and its
    :func:`active_learning_curve`, the loop drawing with ``loop_seed + seed``;
    ``rounds`` defaults to the settings' (fewer: a prefix of the same run)."""
    s = settings
    z = pool_labels(len(features["pool"]), noise, seed)
    curve = active_learning_curve(features["pool"], z, features["heldout"], strategy,
                                  s["loop_seed"] + seed, l2, s["seed_labels"], s["batch"],
                                  s["rounds"] if rounds is None else rounds)
    return z, curve


def run_all(features: dict, l2: float, settings=SETTINGS) -> list[dict]:
    """Every (noise, seed, strategy) curve of :func:`run_curve`, with the fraction of
    flipped labels among its queries after the seed set."""
    s, runs = settings, []
    for noise in s["noise"]:
        for seed in s["seeds"]:
            for strategy in STRATEGIES:
                z, curve = run_curve(features, noise, seed, strategy, l2, settings=s)
                runs.append({"noise": noise, "seed": seed, "strategy": strategy, **curve,
                             "flipped": flipped_fraction(curve["queried"], z,
                                                         s["seed_labels"], s["flip_window"])})
    return runs


def labels_needed(run: dict, fraction: float = SETTINGS["target_fraction"]) -> float:
    """:func:`labels_to_target` of a run, the target ``fraction`` of its last accuracy
    (the whole pool labelled)."""
    check_float("fraction", fraction, low=0.0, high=1.0)
    return labels_to_target(run["labels"], run["accuracy"], fraction * run["accuracy"][-1])


#: Where the runs are recorded (``python -m companion.active --record``).
RECORD = Path(__file__).resolve().parent / "assets" / "active_labelling_runs.json"
COMMAND = "python -m companion.active --record"


def _record_settings() -> dict:
    """:data:`SETTINGS` and the chapter's settings of the frozen SFT model."""
    sft = {k: align.SFT_SETTINGS[k] for k in ("steps", "batch_size")}
    return {**SETTINGS, "start_sft": {**sft, "lr": align.PREF_SETTINGS["start_lr"]}}


def record_runs(path=RECORD, log=print) -> dict:
    """Every curve of :func:`run_all` on :func:`chapter_features` (a minute on a CPU),
    with the development accuracies and the chosen L2, written as JSON to ``path``."""
    features, _ = chapter_features()
    dev, l2 = dev_accuracies(features), choose_l2(features)
    runs = run_all(features, l2)
    log(f"l2 {l2}: {len(runs)} runs")
    return write_record(path, "pool-based active learning of a Bradley--Terry head on "
                        "frozen SFT features (companion.active.record_runs)",
                        _record_settings(), dev=dev, l2=l2, runs=runs)


def load_runs(path=RECORD) -> dict:
    """The recorded runs; ``ValueError`` if they were made with other settings."""
    return load_record(path, _record_settings(), COMMAND)


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.active --record [--out PATH]``."""
    return record_main("python -m companion.active", {"runs": record_runs}, argv,
                       description="Record section 12c's active-learning runs.",
                       threads=1)


def recorded_reward_models(path=align.RECORD) -> list[dict]:
    """The chapter's full reward models (the whole GPT fine-tuned on the 256 pool pairs,
    :func:`companion.align.preference_runs`) from its record: seed, noise and held-out
    pairwise accuracy on the chapter's 48 test pairs. Refuses a record whose reward or
    start-model settings differ from the package's."""
    record = json.loads(Path(path).read_text())
    start = ("steps", "batch_size")
    same = (record["reward"] == align.REWARD_SETTINGS
            and record["pref"]["start_lr"] == align.PREF_SETTINGS["start_lr"]
            and all(record["sft"][k] == align.SFT_SETTINGS[k] for k in start))
    if not same:
        raise ValueError(f"{path} was recorded with other reward or start settings")
    return [{"seed": r["seed"], "noise": r["noise"],
             "accuracy": sum(m > 0 for m in r["margins"]) / len(r["margins"])}
            for r in record["runs"] if r.get("kind") == "reward"]


if __name__ == "__main__":
    raise SystemExit(main())
