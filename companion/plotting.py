"""One look for every figure in the book (book: Introduction, "Conventions").

Call :func:`use_book_style` once at the top of a notebook, then make figures with
:func:`subplots` and finish each axis with :func:`label`, so that every plot has a
title, labelled axes and the same fonts, sizes and colour-blind-safe palette.
Chapter 6's attribution figures are here too: :func:`show_image_attributions` and
:func:`show_text_attribution`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import torch

from companion._validate import check_batch

#: The colour-blind-safe palette of every line and bar in the book, seaborn's
#: ``color_palette("colorblind")`` as RGB triples.
PALETTE = [mcolors.to_rgb(c) for c in ("#0173b2", "#de8f05", "#029e73", "#d55e00",
                                       "#cc78bc", "#ca9161", "#fbafe4", "#949494",
                                       "#ece133", "#56b4e9")]
#: Colormap for sequential quantities (attributions, attention weights, counts).
SEQUENTIAL_CMAP = "viridis"
#: Colormap for signed quantities centred on zero (attributions, differences).
DIVERGING_CMAP = "RdBu_r"
#: Width and height in inches of a one-panel figure.
FIGSIZE = (7.0, 4.2)

_RC = {
    "figure.figsize": FIGSIZE,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "figure.autolayout": False,
    "figure.constrained_layout.use": True,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 12,
    "xtick.labelsize": 10.5,
    "ytick.labelsize": 10.5,
    "legend.fontsize": 10.5,
    "legend.frameon": False,
    "lines.linewidth": 2.0,
    "image.cmap": SEQUENTIAL_CMAP,
    "svg.hashsalt": "companion",  # deterministic ids if a reader saves SVG
}

# seaborn's theme, ``sns.set_theme(context="notebook", style="whitegrid")``, written out
# (less the keys _RC sets): importing seaborn costs every notebook over a second of
# start-up, and only :func:`heatmap` needs seaborn itself. tests/test_plotting.py checks
# these against seaborn's own ``axes_style`` and ``plotting_context``.
_SEABORN_THEME = {
    "axes.axisbelow": True, "axes.edgecolor": ".8", "axes.facecolor": "white",
    "axes.grid": True, "axes.labelcolor": ".15", "axes.linewidth": 1.25,
    "axes.spines.bottom": True, "axes.spines.left": True, "axes.spines.right": True,
    "axes.spines.top": True, "figure.facecolor": "white", "font.family": ["sans-serif"],
    "font.sans-serif": ["Arial", "DejaVu Sans", "Liberation Sans", "Bitstream Vera Sans",
                        "sans-serif"],
    "font.size": 12, "grid.color": ".8", "grid.linestyle": "-", "grid.linewidth": 1,
    "legend.title_fontsize": 12, "lines.markersize": 6, "lines.solid_capstyle": "round",
    "patch.edgecolor": "w", "patch.force_edgecolor": True, "patch.linewidth": 1,
    "text.color": ".15", "xtick.bottom": False, "xtick.color": ".15",
    "xtick.direction": "out", "xtick.major.size": 6, "xtick.major.width": 1.25,
    "xtick.minor.size": 4, "xtick.minor.width": 1, "xtick.top": False,
    "ytick.color": ".15", "ytick.direction": "out", "ytick.left": False,
    "ytick.major.size": 6, "ytick.major.width": 1.25, "ytick.minor.size": 4,
    "ytick.minor.width": 1, "ytick.right": False,
}


def use_book_style() -> None:
    """Set the book's matplotlib style for the rest of the session.

    seaborn's whitegrid theme in its notebook context, with :data:`PALETTE` as the
    colour cycle and the book's sizes on top. Idempotent. In a notebook it also selects
    PNG figures for the inline backend, which is what the stored outputs of the book
    contain, at a fixed size: the figure's own size times ``figure.dpi`` (no cropping to
    the drawn content), so that a stored figure and a fresh one can be compared pixel by
    pixel (``tools/nbval_tolerant.py``).
    """
    plt.rcParams.update(_SEABORN_THEME)
    plt.rcParams.update(_RC)
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=PALETTE)
    try:  # only inside IPython/Jupyter
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        if get_ipython() is not None:
            set_matplotlib_formats("png", bbox_inches=None)
    except ImportError:  # pragma: no cover - IPython is not required outside notebooks
        pass


def subplots(nrows: int = 1, ncols: int = 1, *, title: str | None = None, figsize=None, **kw):
    """``plt.subplots`` with the book's figure size scaled to the grid.

    Returns ``(fig, axes)`` exactly like :func:`matplotlib.pyplot.subplots`;
    ``title`` becomes the figure's super-title.
    """
    if nrows < 1 or ncols < 1:
        raise ValueError(f"nrows and ncols must be >= 1, got nrows={nrows}, ncols={ncols}")
    if figsize is None:
        width = min(FIGSIZE[0] * max(1.0, 0.62 * ncols), 15.0)
        figsize = (width, FIGSIZE[1] * (0.9 * nrows if nrows > 1 else 1.0))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **kw)
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")
    return fig, axes


def label(ax, title: str, xlabel: str, ylabel: str, *, legend: bool | None = None):
    """Give ``ax`` a title and axis labels (every figure in the book has all three).

    ``legend=None`` draws a legend only if some artist has a label.
    """
    for name, value in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, _ = ax.get_legend_handles_labels()
    if legend or (legend is None and handles):
        ax.legend()
    return ax


def heatmap(
    matrix,
    ax,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xticklabels: Sequence[str] | str = "auto",
    yticklabels: Sequence[str] | str = "auto",
    cmap: str = SEQUENTIAL_CMAP,
    center: float | None = None,
    annot: bool = False,
    fmt: str = ".2f",
    cbar_label: str | None = None,
):
    """A labelled seaborn heatmap of a 2-D array or tensor (attention, confusion...).

    Tensors are moved to the CPU; ``center=0`` with :data:`DIVERGING_CMAP` suits
    signed values.
    """
    import seaborn as sns  # imported here: it costs a second, and only heatmaps need it

    values = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix)
    if values.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {values.shape}")
    sns.heatmap(
        values,
        ax=ax,
        cmap=cmap,
        center=center,
        annot=annot,
        fmt=fmt,
        xticklabels=xticklabels,
        yticklabels=yticklabels,
        square=False,
        cbar_kws={"label": cbar_label} if cbar_label else None,
    )
    return label(ax, title, xlabel, ylabel, legend=False)


def close_all() -> None:
    """Close every open figure (useful in loops that draw many figures)."""
    plt.close("all")


__all__ = [
    "PALETTE",
    "SEQUENTIAL_CMAP",
    "DIVERGING_CMAP",
    "FIGSIZE",
    "use_book_style",
    "subplots",
    "label",
    "heatmap",
    "close_all",
    "show_image_attributions",
    "show_text_attribution",
]


# ------------------------------------------------------------------- attributions (chapter 6)


def show_image_attributions(images: torch.Tensor, attributions: Mapping[str, torch.Tensor],
                            *, title: str, row_labels: Sequence[str] | None = None,
                            image_shape: tuple[int, int] | None = None):
    """A grid: one row per image, the image first, then one column per attribution method.

    Each attribution panel is divided by its own largest absolute value, so that every
    panel spans the shared colour bar ("scaled attribution") from -1 (blue: evidence
    against the target) to +1 (red: evidence for it); the methods' raw units differ.
    The input column is drawn in grey levels from black (0, the background of the digits
    and the "black" baseline) to white (the image's largest value).
    ``images`` is ``(N, ...)``, reshaped to ``image_shape`` (default: the last two
    dimensions); ``attributions`` maps a method name to a tensor shaped like ``images``.
    Method names longer than 12 characters wrap at a space. Returns the figure.
    """
    images = check_batch("images", images)
    if not attributions:
        raise ValueError("attributions must name at least one method")
    for name, values in attributions.items():
        if tuple(values.shape) != tuple(images.shape):
            raise ValueError(f"attributions[{name!r}] must have the shape of images, "
                             f"{tuple(images.shape)}, got {tuple(values.shape)}")
    shape = tuple(image_shape or images.shape[-2:])
    n_rows, n_cols = images.shape[0], 1 + len(attributions)
    fig, axes = subplots(n_rows, n_cols, title=title, squeeze=False,
                         figsize=(1.45 * n_cols + 1.0, 1.45 * n_rows + 0.7))
    columns = [("input", images, "gray")] + [(k, v, DIVERGING_CMAP)
                                                 for k, v in attributions.items()]
    for col, (name, values, cmap) in enumerate(columns):
        values = values.detach().to("cpu", torch.float64).numpy()
        for row in range(n_rows):
            ax, panel = axes[row, col], values[row].reshape(shape)
            if col == 0:
                ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=max(panel.max(), 1e-12))
                ax.set_ylabel(row_labels[row] if row_labels else f"example {row}")
            else:
                scale = max(np.abs(panel).max(), 1e-12)
                image = ax.imshow(panel / scale, cmap=cmap, vmin=-1.0, vmax=1.0)
            if row == 0:  # long names wrap at a space, so that neighbouring titles keep apart
                ax.set_title(textwrap.fill(name, 12, break_long_words=False), fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    colorbar = fig.colorbar(image, ax=axes, shrink=min(0.8, 0.3 + 0.15 * n_rows), pad=0.02,
                            aspect=12 + 4 * n_rows)
    colorbar.set_label("scaled attribution", fontsize=10)
    colorbar.set_ticks([-1.0, 0.0, 1.0])
    return fig


def _printable(character: str) -> str:
    return {" ": "\u2423", "\n": "\u21b5", "\t": "\u2192"}.get(character, character)


def show_text_attribution(text: str, scores, ax, *, title: str, line_width: int = 32,
                          cbar_label: str = "attribution"):
    """Characters of ``text`` on a grid, each cell coloured by its score (red +, blue -).

    ``scores`` has one number per character; the colour scale is symmetric about zero
    (white). The text wraps every ``line_width`` characters; spaces show as ``\u2423``
    and newlines as ``\u21b5``. Returns ``ax``.
    """
    values = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores,
                        dtype=np.float64)
    if values.ndim != 1 or len(values) != len(text):
        raise ValueError(f"scores must hold one number per character ({len(text)}), got "
                         f"shape {values.shape}")
    n_lines = -(-len(text) // line_width)
    grid = np.full(n_lines * line_width, np.nan)
    grid[:len(text)] = values
    limit = max(float(np.abs(values).max()), 1e-12)
    image = ax.imshow(np.ma.masked_invalid(grid.reshape(n_lines, line_width)),
                      cmap=DIVERGING_CMAP, vmin=-limit, vmax=limit, aspect="auto")
    for position, (character, value) in enumerate(zip(text, values)):
        ax.text(position % line_width, position // line_width, _printable(character),
                ha="center", va="center", fontsize=10, family="monospace",
                color="white" if abs(value) > 0.6 * limit else "black")  # legible on dark
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, pad=0.01).set_label(cbar_label)
    return label(ax, title, "character (read left to right, top to bottom)", "line")
