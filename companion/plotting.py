"""One look for every figure in the book (book: Introduction, "Conventions").

Call :func:`use_book_style` once at the top of a notebook, then make figures with
:func:`subplots` and finish each axis with :func:`label`, so that every plot has a
title, labelled axes and the same fonts, sizes and colour-blind-safe palette.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

#: Colour-blind-safe palette used for every line and bar in the book.
PALETTE = sns.color_palette("colorblind")
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


def use_book_style() -> None:
    """Set the book's matplotlib/seaborn style for the rest of the session.

    Idempotent. In a notebook it also selects PNG figures for the inline backend,
    which is what the stored outputs of the book contain, at a fixed size: the figure's
    own size times ``figure.dpi`` (no cropping to the drawn content), so that a stored
    figure and a fresh one can be compared pixel by pixel (``tests/nbval_tolerant.py``).
    """
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, rc=_RC)
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
]
