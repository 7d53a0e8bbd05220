"""Optimising against a reward: KL to the reference, and best-of-n over-optimisation.

Book: chapter 12, section "Optimising against a reward" (``12b_optimising_rewards``).

**KL to the reference.** For a response ``y = (y_1 .. y_L)`` sampled from the policy,
the sequence KL factorises over the tokens (the chain rule of KL):

    KL(pi || ref) = E_{y ~ pi} [ sum_t KL(pi(. | x, y_<t) || ref(. | x, y_<t)) ].

:func:`sampled_kl` sums the *exact* per-token KL of the two next-token distributions
(:func:`token_kls`, float64) along sampled responses: an unbiased estimate of the
sequence KL, usually (not always: each term is averaged given its own prefix only) with
less variance than the log-ratio ``log pi(y) - log ref(y)``, whose per-token terms it
averages over the vocabulary. A response ends where it first
completes a stop sequence (:func:`until_mask`; the chat's end of turn), a stopping time,
so the estimate stays unbiased for the KL of the stopped responses.

**Best of n.** Of ``n`` responses drawn from the reference, keep the one the proxy reward
ranks highest. With ``N >= n`` samples, sorted by the proxy, the ``i``-th smallest
(1-based) is the pick of a uniformly random ``n``-subset with probability
``C(i - 1, n - 1) / C(N, n)``; :func:`best_of_n` weights any score by these, the
unbiased estimate of the pick's expected score. Its KL to the reference is at most
``log n - (n - 1) / n`` (:func:`best_of_n_kl`; equal for continuous, untied rewards;
Stiennon et al. 2020, Gao et al. 2023).

:func:`record_reward_opt` records the section's runs (DPO over a grid of beta, and best
of n against clean and noisy reward models, three seeds); ``python -m
companion.reward_opt --record beta_bon`` writes them.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from companion import align, records
from companion._validate import check_int, check_tensor, check_type
from companion.data import CharTokenizer


def token_kls(policy: nn.Module, reference: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T - 1)`` float64: ``KL(pi(. | ids[:, :t]) || ref(. | ids[:, :t]))``, exact
    over the vocabulary, for the distributions of token t = 1 .. T - 1."""
    check_tensor("ids", ids, ndim=2)
    logp = align._logits(policy, ids)[:, :-1].double().log_softmax(-1)  # (B, T-1, V)
    logq = align._logits(reference, ids)[:, :-1].double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def sampled_kl(policy: nn.Module, reference: nn.Module, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64: the per-token KLs summed over the response tokens where ``mask
    (B, T)`` is True (as :func:`~companion.align.sequence_logps`). With ``ids`` sampled
    from ``policy``, its mean is an unbiased estimate of the sequence KL."""
    check_tensor("mask", mask, ndim=2, dtype=torch.bool)
    if mask.shape != ids.shape:
        raise ValueError(f"mask must have the shape of ids {tuple(ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask[:, 0].any():
        raise ValueError("mask must be False at position 0 (nothing predicts it)")
    return (token_kls(policy, reference, ids) * mask[:, 1:]).sum(-1)


def until_mask(ids: torch.Tensor, start: int, stop: list[int]) -> torch.Tensor:
    """``(B, T)`` bool: True on ``ids[:, start:]`` up to and including the first
    completed ``stop`` sequence (to the end if none) -- it depends only on the tokens
    before each position, a stopping time."""
    check_tensor("ids", ids, ndim=2)
    check_int("start", start, low=1, high=ids.size(1))
    if not stop:
        raise ValueError("stop must hold at least one token id")
    mask = torch.zeros_like(ids, dtype=torch.bool)
    k = len(stop)
    for b, row in enumerate(ids.tolist()):
        end = len(row)
        for t in range(start + k - 1, len(row)):
            if row[t - k + 1:t + 1] == list(stop) and t - k + 1 >= start:
                end = t + 1
                break
        mask[b, start:end] = True
    return mask


@torch.no_grad()
def sample_responses(model, tokenizer: CharTokenizer, messages: list[dict], n: int,
                     max_new_tokens: int = 16, generator=None):
    """``n`` responses to ``messages`` sampled at temperature 1: ``ids (n, P + L)``, the
    :func:`until_mask` of each response's turn, and the answers' texts (cut at the end
    of turn)."""
    check_int("n", n, low=1)
    text, _ = align.render_chat(messages, add_generation_prompt=True)
    prompt = tokenizer.encode(text)[None].repeat(n, 1)  # (n, P)
    ids = model.generate(prompt, max_new_tokens, temperature=1.0, generator=generator)
    mask = until_mask(ids, prompt.size(1), tokenizer.encode(align.END_OF_TURN).tolist())
    texts = [tokenizer.decode(r[prompt.size(1):].tolist()).split(align.END_OF_TURN)[0]
             for r in ids]
    return ids, mask, texts


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer: CharTokenizer, prompts: list[dict],
                    samples: int, seed: int):
    """``(P, samples)`` float64 each: :func:`sampled_kl` and the log-ratio
    ``log pi(y) - log ref(y)`` of ``samples`` responses of ``policy`` to each prompt
    (nats; sampled with ``torch.Generator().manual_seed(seed)``). Both average to the KL."""
    generator = torch.Generator().manual_seed(seed)
    kls, ratios = [], []
    for e in prompts:
        ids, mask, _ = sample_responses(policy, tokenizer, e["messages"][:1], samples,
                                        generator=generator)
        kls.append(sampled_kl(policy, reference, ids, mask))
        ratios.append(align.sequence_logps(policy, ids, mask).double()
                      - align.sequence_logps(reference, ids, mask).double())
    return torch.stack(kls), torch.stack(ratios)


def best_of_n(proxy: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """``(...)`` float64: the expected ``score`` of the best-by-``proxy`` of ``n`` of the
    ``N`` samples along the last dimension, over all ``n``-subsets alike (ties in the
    proxy go to the later sample)."""
    check_tensor("proxy", proxy, floating=True)
    check_tensor("score", score)
    if proxy.shape != score.shape or proxy.ndim < 1:
        raise ValueError(f"proxy and score must share a shape (..., N), got "
                         f"{tuple(proxy.shape)} and {tuple(score.shape)}")
    N = proxy.size(-1)
    check_int("n", n, low=1, high=N)
    order = proxy.argsort(dim=-1, stable=True)  # ascending; ties keep the sample order
    ranked = score.double().gather(-1, order)  # (..., N)
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(N, n) for i in range(N)],
                           dtype=torch.float64)  # P(the (i+1)-th smallest is the pick)
    return (ranked * weights).sum(-1)


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1) / n``: the bound on the KL of best-of-n to the sampling policy
    (nats; Stiennon et al. 2020), near equality when no single answer is likely
    (Beirami et al. 2024)."""
    check_int("n", n, low=1)
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def reward_scores(reward_model: align.RewardModel, tokenizer: CharTokenizer,
                  messages: list[dict], answers: list[str]) -> torch.Tensor:
    """``(len(answers),)``: the reward model's score of each answer to ``messages``."""
    check_type("reward_model", reward_model, align.RewardModel)
    convs = [messages + [{"role": "assistant", "content": a}] for a in answers]
    ids, mask = align.pad_batch(*zip(*(align.encode_chat(c, tokenizer) for c in convs)))
    return reward_model(ids, mask)


# --------------------------------------------------------------------------- the record

#: Where ``python -m companion.reward_opt --record beta_bon`` writes the runs.
RECORD = Path(__file__).resolve().parent / "assets" / "reward_opt_runs.json"
#: DPO from the chapter's SFT start at each beta, on clean pairs, at one fixed rate (not
#: tuned per beta: a dose-response, not a comparison) and twice the chapter's steps;
#: KL on the test prompts from ``kl_samples`` responses each.
BETA_SETTINGS = {"betas": [0.03, 0.1, 0.3, 1.0], "steps": 40, "lr": 3e-4,
                 "batch_size": 8, "noise": 0.0, "kl_samples": 4}
#: For best of n, ``samples`` responses per test prompt from the SFT start, scored by a
#: reward model trained (the chapter's settings) on pairs with each ``noise``.
BON_SETTINGS = {"samples": 32, "noise": [0.0, 0.3], "max_new_tokens": 16}
SEEDS = (0, 1, 2)


def beta_runs(seed: int) -> list[dict]:
    """Per beta: DPO from the SFT start of ``seed``, its greedy test results and its
    per-prompt KL to the start (and the start's own results, ``beta=None``)."""
    s = BETA_SETTINGS
    start, corpus, _, test, prefs = align._start_model(seed)
    tok, pairs = corpus.tokenizer, align.preference_pairs(prefs, s["noise"], seed)
    runs = [{"kind": "start", "seed": seed, "beta": None,
             **align.evaluate(start, tok, test)}]
    for beta in s["betas"]:
        dpo = copy.deepcopy(start)
        losses = align.train_dpo(dpo, start, tok, pairs, s["steps"], s["lr"], beta,
                                 s["batch_size"], seed)
        kl, ratio = kl_to_reference(dpo, start, tok, test, s["kl_samples"], seed)
        runs.append({"kind": "dpo", "seed": seed, "beta": beta, "losses": losses,
                     "kl": kl.tolist(), "log_ratio": ratio.tolist(),
                     **align.evaluate(dpo, tok, test)})
    return runs


def bon_samples(start, tok, test: list[dict], seed: int) -> list[dict]:
    """``BON_SETTINGS["samples"]`` sampled answers per test prompt with their truth:
    correct, and in the format (:func:`~companion.align.follows_format`)."""
    s, out = BON_SETTINGS, []
    generator = torch.Generator().manual_seed(seed)
    for e in test:
        ids, _, texts = sample_responses(start, tok, e["messages"][:1], s["samples"],
                                         s["max_new_tokens"], generator)
        raws = [tok.decode(r.tolist()) for r in ids[:, -s["max_new_tokens"]:]]
        out.append({"texts": texts,
                    "correct": [t == e["messages"][1]["content"] for t in texts],
                    "format": [align.follows_format(e["task"], e["word"], r)
                               for r in raws]})
    return out


def bon_runs(seed: int) -> list[dict]:
    """The SFT start's samples on the test prompts, scored by a reward model trained
    on pairs at each noise rate (per prompt: the proxy rewards of the samples)."""
    r = align.REWARD_SETTINGS
    start, corpus, _, test, prefs = align._start_model(seed)
    tok = corpus.tokenizer
    samples = bon_samples(start, tok, test, seed)
    runs = [{"kind": "samples", "seed": seed, "prompts": samples}]
    for noise in BON_SETTINGS["noise"]:
        torch.manual_seed(seed)
        rm = align.RewardModel(start)
        pairs = align.preference_pairs(prefs, noise, seed)
        losses = align.train_reward(rm, tok, pairs, r["steps"], r["lr"], r["batch_size"],
                                    seed)
        proxy = [reward_scores(rm, tok, e["messages"][:1], p["texts"]).tolist()
                 for e, p in zip(test, samples)]
        runs.append({"kind": "reward", "seed": seed, "noise": noise, "losses": losses,
                     "proxy": proxy})
    return runs


def _worker(job):
    return beta_runs(job[1]) if job[0] == "beta" else bon_runs(job[1])


def _settings() -> dict:
    sft = align.SFT_SETTINGS  # the SFT start: align._start_model's settings
    return {"beta": BETA_SETTINGS, "bon": BON_SETTINGS, "reward": align.REWARD_SETTINGS,
            "sft_start": {"steps": sft["steps"], "batch_size": sft["batch_size"],
                          "lr": align.PREF_SETTINGS["start_lr"]}}


def record_reward_opt(path=RECORD, seeds=SEEDS, jobs: int = 2) -> dict:
    """Run the section's grid (about a minute of one core per job) and write it as
    JSON: per seed, DPO at each beta, and best-of-n samples with their proxy rewards."""
    import multiprocessing
    grid = [(part, seed) for seed in seeds for part in ("beta", "bon")]
    runs = []
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for out in pool.imap_unordered(_worker, grid, chunksize=1):
            runs += out
    runs = sorted(runs, key=lambda r: (r["seed"], r["kind"], str(r.get("beta")),
                                       str(r.get("noise"))))
    record = {"what": "companion.reward_opt.record_reward_opt", "torch": torch.__version__,
              "threads": 1, **_settings(), "runs": runs}
    Path(path).write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


#: The command that re-records :data:`RECORD`.
COMMAND = "python -m companion.reward_opt --record beta_bon"


def load_record(path=RECORD) -> dict:
    """The recorded runs; ``ValueError`` (naming :data:`COMMAND`) if they were made with
    other settings (:func:`companion.records.check_settings`, on the record's top-level
    settings fields)."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    settings = _settings()
    records.check_settings(path, {k: record.get(k) for k in settings}, settings, COMMAND)
    return record


def main(argv=None) -> int:
    """``python -m companion.reward_opt --record beta_bon [--out PATH] [--jobs J]``."""
    jobs = {**records.JOBS_OPTION, "default": 2}
    return records.record_main("python -m companion.reward_opt",
                               {"beta_bon": record_reward_opt}, argv,
                               description="record the section's runs as JSON",
                               options={"--jobs": jobs})


if __name__ == "__main__":
    raise SystemExit(main())
