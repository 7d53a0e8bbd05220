"""Number formats and mixed precision: rounding to low-precision grids, dynamic loss scaling.

Chapter 7 (sections "Number formats" and "Mixed precision"). A binary floating-point format
with ``M`` stored mantissa bits and smallest normal exponent ``e_min`` holds, around a value
``x`` with ``2^e <= |x| < 2^(e+1)``, the multiples of the step

    q(x) = 2^(max(e, e_min) - M)

so that rounding ``x`` to the format is ``round_half_even(x / q) * q``, followed by what
the format does above its largest finite value (infinity, or saturation for
``float8_e4m3fn``). :func:`round_to` does this with integer arithmetic on the float32 bit
pattern and reproduces ``x.to(dtype).to(torch.float32)`` bit for bit (NaN excepted: it
returns the canonical quiet NaN, while PyTorch's NaN payload depends on the CPU code path).

:class:`LossScaler` is dynamic loss scaling (Micikevicius et al., 2018): multiply the loss
by ``S`` so that small float16 gradients do not underflow, divide the gradients by ``S``
before the step, skip the step and shrink ``S`` when a gradient overflowed, and grow ``S``
after ``growth_interval`` clean steps. Its scale trajectory equals ``torch.amp.GradScaler``'s.

:func:`autocast_run` is section "Training in bfloat16"'s experiment: a small GPT trained in
float32 and under bfloat16 autocast from the same start on the same batches. Its six runs
(two precisions, three seeds) are recorded in ``assets/autocast_runs.json`` by
``python -m companion.precision --record``; the page re-trains seed 0 and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ._validate import check_float, check_int, check_tensor, check_type
from .records import load_record, record_main, write_record


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: stored mantissa bits, exponent range, overflow rule."""

    name: str
    mantissa_bits: int   # M: bits after the binary point
    exponent_bits: int
    min_exponent: int    # e_min: exponent of the smallest normal number
    max_finite: float    # largest finite value
    saturates: bool      # True: overflow -> +-max_finite; False: overflow -> +-inf

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.min_exponent

    @property
    def epsilon(self) -> float:
        """The gap between 1 and the next larger number, ``2^-M``."""
        return 2.0 ** -self.mantissa_bits


#: The formats :func:`round_to` knows, keyed by their PyTorch dtype. PyTorch 2.13 saturates
#: float8_e4m3fn (which has no infinity): values beyond 448, and +-inf, become +-448.
FORMATS = {
    torch.float32: Format("float32", 23, 8, -126, float(torch.finfo(torch.float32).max), False),
    torch.bfloat16: Format("bfloat16", 7, 8, -126, float(torch.finfo(torch.bfloat16).max), False),
    torch.float16: Format("float16", 10, 5, -14, 65504.0, False),
    torch.float8_e5m2: Format("float8_e5m2", 2, 5, -14, 57344.0, False),
    torch.float8_e4m3fn: Format("float8_e4m3fn", 3, 4, -6, 448.0, True),
}

_SIGN = -0x80000000          # bit 31 of an int32
_QUIET_NAN = 0x7FC00000


def _check_dtype(dtype) -> Format:
    check_type("dtype", dtype, torch.dtype)
    if dtype not in FORMATS or dtype == torch.float32:
        names = ", ".join(str(d) for d in FORMATS if d != torch.float32)
        raise ValueError(f"dtype must be one of {names}, got {dtype}")
    return FORMATS[dtype]


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` as float32, built from bits (exponent in [-149, 127], int32)."""
    normal = (exponent + 127).clamp(min=0) << 23                         # biased exponent field
    subnormal = torch.ones_like(exponent) << (exponent + 149).clamp(0, 22)
    return torch.where(exponent >= -126, normal, subnormal).view(torch.float32)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to the grid of ``dtype`` (nearest, ties to even); float32 result.

    Equals ``x.to(dtype).to(torch.float32)`` bit for bit for every non-NaN input, including
    subnormals, exact ties, overflow and +-inf; NaN gives the quiet NaN ``0x7FC00000``.
    """
    check_tensor("x", x, dtype=torch.float32)
    fmt = _check_dtype(dtype)
    bits = x.view(torch.int32)
    sign = bits & _SIGN
    a = (bits & 0x7FFFFFFF).long()                                      # |x| bits, int64
    field = a >> 23                                                     # biased exponent
    # |x| = m * 2^k with an integer significand m (implicit leading 1 for normal numbers)
    m = torch.where(field > 0, (a & 0x7FFFFF) | (1 << 23), a & 0x7FFFFF)
    k = field.clamp(min=1) - 150
    # the format's step at this magnitude: 2^(max(e, e_min) - M)
    step_exp = torch.maximum(field.clamp(min=1) - 127,
                             torch.full_like(field, fmt.min_exponent)) - fmt.mantissa_bits
    shift = (step_exp - k).clamp(max=40)                                 # always >= 1 here
    half = (torch.ones_like(shift) << (shift - 1)) - 1
    odd = (m >> shift) & 1
    r = (m + half + odd) >> shift                                       # round half to even
    y = r.to(torch.float32) * _power_of_two(step_exp.int())             # exact product
    big = fmt.max_finite if fmt.saturates else float("inf")             # overflow rule
    y = torch.where((y > fmt.max_finite) | (field == 255), big, y)
    out = y.view(torch.int32) | sign                                    # restore the sign
    out = torch.where(a > 0x7F800000, _QUIET_NAN, out)
    return out.view(torch.float32)


def underflow_fraction(x: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of the nonzero entries of float32 ``x`` that become zero in ``dtype``."""
    check_tensor("x", x, dtype=torch.float32)
    nonzero = x != 0
    if not bool(nonzero.any()):
        return 0.0
    lost = nonzero & (round_to(x, dtype) == 0)
    return float(lost.sum()) / float(nonzero.sum())


class LossScaler:
    """Dynamic loss scaling, with the interface and the arithmetic of ``torch.amp.GradScaler``.

    Per step: ``scaler.scale(loss).backward()``; ``scaler.step(optimizer)`` (unscales the
    gradients if :meth:`unscale_` was not called, and skips ``optimizer.step()`` when a
    gradient is inf or NaN); ``scaler.update()``: on overflow ``S <- S * backoff_factor``,
    otherwise after ``growth_interval`` consecutive clean steps ``S <- S * growth_factor``.
    The scale is kept in float32, as GradScaler keeps it.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        check_float("init_scale", init_scale, 0.0, low_open=True)
        check_float("growth_factor", growth_factor, 1.0, low_open=True)
        check_float("backoff_factor", backoff_factor, 0.0, 1.0, low_open=True, high_open=True)
        check_int("growth_interval", growth_interval, 1)
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self._growth_tracker = 0
        self._found_inf: dict[int, bool] = {}   # id(optimizer) -> overflow seen when unscaling

    def get_scale(self) -> float:
        return float(self._scale)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S`` (the scale is moved to the loss's device)."""
        check_tensor("loss", loss, floating=True)
        return loss * self._scale.to(loss.device)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient by ``S`` in place and record whether any is inf or NaN."""
        check_type("optimizer", optimizer, torch.optim.Optimizer)
        if id(optimizer) in self._found_inf:
            raise RuntimeError("unscale_() has already been called on this optimizer "
                               "since the last update()")
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                found_inf |= not bool(torch.isfinite(p.grad).all())
                p.grad.mul_(inv_scale.to(p.grad.device))
        self._found_inf[id(optimizer)] = found_inf

    def step(self, optimizer: torch.optim.Optimizer):
        """Unscale if needed, then ``optimizer.step()`` unless a gradient overflowed."""
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)]:
            return None
        return optimizer.step()

    def update(self) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps."""
        found_inf = any(self._found_inf.values())
        if found_inf:
            self._scale = self._scale * self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = self._scale * self.growth_factor
                if bool(torch.isfinite(grown)):
                    self._scale = grown
                self._growth_tracker = 0
        self._found_inf = {}

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = torch.tensor(float(state["scale"]), dtype=torch.float32)
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])


# ------------------------------------------------- section "Training in bfloat16": the runs

#: The runs of section "Training in bfloat16 on the CPU" -- chapter 4's notebook GPT shape,
#: 80 AdamW steps of 8 windows, scored on 64 validation windows; both precisions, 3 seeds.
AUTOCAST_SETTINGS = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64,
                     "steps": 80, "batch_size": 8, "lr": 1e-3, "val_windows": 64,
                     "seeds": [0, 1, 2], "precisions": ["float32", "bf16"]}
#: Where ``python -m companion.precision --record`` writes them.
AUTOCAST_RECORD = Path(__file__).resolve().parent / "assets" / "autocast_runs.json"
_AUTOCAST_DTYPES = {"float32": None, "bf16": torch.bfloat16}


def autocast_run(corpus, seed: int, precision: str, device=None):
    """One run: initialised after ``torch.manual_seed(seed)``, batches drawn from seed
    ``100 + seed`` -- the same for both precisions. Returns its ``LMHistory``."""
    from .train import fixed_windows, train_language_model
    from .transformer import GPT, GPTConfig

    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(_AUTOCAST_DTYPES)}, got {precision!r}")
    s, block = AUTOCAST_SETTINGS, AUTOCAST_SETTINGS["block_size"]
    config = GPTConfig(vocab_size=corpus.vocab_size, block_size=block, n_layer=s["n_layer"],
                       n_head=s["n_head"], n_embd=s["n_embd"], dropout=0.0)
    val = fixed_windows(corpus.val_ids, block, num_windows=s["val_windows"])
    torch.manual_seed(seed)  # the same initialisation for both precisions
    net = GPT(config).to(device)
    batches = torch.Generator().manual_seed(100 + seed)  # and the same batches
    return train_language_model(
        net,
        torch.optim.AdamW(net.parameters(), lr=s["lr"]),
        lambda: corpus.get_batch("train", s["batch_size"], block, generator=batches,
                                 device=device),
        steps=s["steps"],
        eval_every=s["steps"],
        eval_batches={"val": tuple(t.to(device) for t in val)},
        autocast_dtype=_AUTOCAST_DTYPES[precision],
    )


def record_autocast_runs(path: str | Path = AUTOCAST_RECORD, log=print) -> dict:
    """Train all of the section's runs on the CPU and write their losses to ``path``."""
    from .data import CharCorpus

    corpus, runs = CharCorpus(), []
    for seed in AUTOCAST_SETTINGS["seeds"]:
        for precision in AUTOCAST_SETTINGS["precisions"]:
            h = autocast_run(corpus, seed, precision, torch.device("cpu"))
            runs.append({"precision": precision, "seed": seed, "step_loss": h.step_loss,
                         "val_loss": h.val_loss})
            log(f"{precision} {seed} {h.val_loss[-1]:.4f}")
    return write_record(path, "companion.precision.record_autocast_runs", AUTOCAST_SETTINGS,
                        runs=runs)


def load_autocast_record(path: str | Path = AUTOCAST_RECORD) -> dict:
    """The recorded runs as ``{(precision, seed): LMHistory}``; refuses a record made with
    other settings than ``AUTOCAST_SETTINGS``."""
    from .train import LMHistory

    record = load_record(path, AUTOCAST_SETTINGS, "python -m companion.precision --record")
    return {(r["precision"], r["seed"]): LMHistory(step_loss=r["step_loss"],
                                                   val_loss=r["val_loss"])
            for r in record["runs"]}


def main(argv=None) -> int:
    """``python -m companion.precision --record``: re-record the bfloat16 training runs."""
    return record_main("python -m companion.precision", {"autocast": record_autocast_runs},
                       argv, description=main.__doc__, threads=1)


if __name__ == "__main__":
    main()
