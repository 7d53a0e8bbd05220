"""companion.plotting: the book's figure style and helpers."""

import matplotlib

matplotlib.use("Agg")

import subprocess  # noqa: E402
import sys  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from companion import plotting  # noqa: E402
from companion.plotting import show_image_attributions, show_text_attribution  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_style_sets_figure_size_and_palette():
    plotting.use_book_style()
    assert tuple(plt.rcParams["figure.figsize"]) == plotting.FIGSIZE
    assert plt.rcParams["axes.titleweight"] == "bold"
    first_colour = plt.rcParams["axes.prop_cycle"].by_key()["color"][0]
    assert matplotlib.colors.to_hex(first_colour) == matplotlib.colors.to_hex(plotting.PALETTE[0])


def test_style_is_seaborns_theme_without_importing_seaborn():
    """use_book_style sets exactly what sns.set_theme(whitegrid, notebook) would."""
    import seaborn as sns

    assert [tuple(c) for c in sns.color_palette("colorblind")] == plotting.PALETTE
    try:
        matplotlib.rcdefaults()
        sns.set_theme(context="notebook", style="whitegrid", palette=plotting.PALETTE,
                      rc=plotting._RC)
        expected = dict(plt.rcParams)
        matplotlib.rcdefaults()
        plotting.use_book_style()
        got = dict(plt.rcParams)
    finally:
        matplotlib.rcdefaults()
        plotting.use_book_style()
    assert {k for k in expected if expected[k] != got[k]} == set()


def test_the_book_style_does_not_import_seaborn():
    code = ("import sys; from companion.plotting import use_book_style; use_book_style(); "
            "print('seaborn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_subplots_scales_with_grid_and_sets_title():
    fig, axes = plotting.subplots(1, 3, title="Three panels")
    assert axes.shape == (3,)
    assert fig.get_size_inches()[0] > plotting.FIGSIZE[0]
    assert fig._suptitle.get_text() == "Three panels"


def test_subplots_rejects_empty_grid():
    with pytest.raises(ValueError, match="nrows"):
        plotting.subplots(0, 1)


def test_label_sets_all_three_and_legend():
    fig, ax = plotting.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    plotting.label(ax, "Title", "x", "y")
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Title", "x", "y")
    assert ax.get_legend() is not None


@pytest.mark.parametrize("field", ["title", "xlabel", "ylabel"])
def test_label_requires_every_text(field):
    fig, ax = plotting.subplots()
    texts = {"title": "t", "xlabel": "x", "ylabel": "y", field: " "}
    with pytest.raises(ValueError, match=field):
        plotting.label(ax, **texts)


def test_heatmap_accepts_tensor_and_rejects_1d():
    fig, ax = plotting.subplots()
    plotting.heatmap(torch.eye(3), ax, title="I", xlabel="key", ylabel="query", annot=True)
    assert ax.get_title() == "I" and len(ax.collections) == 1
    with pytest.raises(ValueError, match="2-D"):
        plotting.heatmap(torch.ones(3), ax, title="t", xlabel="x", ylabel="y")


def test_notebook_figures_have_a_fixed_size_in_pixels():
    """What the inline backend stores: figsize x dpi pixels, whatever is drawn."""
    import base64
    import io

    from IPython.core.pylabtools import print_figure
    from matplotlib import image

    plotting.use_book_style()
    sizes = set()
    for label in ("short", "a much longer title than the other one " * 3):
        fig, ax = plotting.subplots()
        ax.plot([0, 1], [0, 1e6], label=label)
        plotting.label(ax, label, "x (units)", "y (units)")
        png = print_figure(fig, "png", bbox_inches=None, base64=True)
        pixels = image.imread(io.BytesIO(base64.b64decode(png)), format="png")
        sizes.add(pixels.shape[:2])
    dpi = plt.rcParams["figure.dpi"]
    assert sizes == {(round(plotting.FIGSIZE[1] * dpi), round(plotting.FIGSIZE[0] * dpi))}


# ------------------------------------------------------------------- attributions (chapter 6)


def test_show_image_attributions_draws_a_labelled_grid():
    images = torch.rand(2, 1, 8, 8)
    fig = show_image_attributions(images, {"IG": torch.randn(2, 1, 8, 8),
                                           "saliency": torch.rand(2, 1, 8, 8)},
                                  title="Two methods", row_labels=["a 3", "a 5"])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    assert [ax.get_title() for ax in panels[:3]] == ["input", "IG", "saliency"]
    assert panels[0].get_ylabel() == "a 3" and fig._suptitle.get_text() == "Two methods"
    with pytest.raises(ValueError, match=r"attributions\['IG'\] must have the shape"):
        show_image_attributions(images, {"IG": torch.zeros(2, 64)}, title="t")


def test_show_text_attribution_one_cell_per_character():
    fig, ax = plt.subplots()
    show_text_attribution("def f(x):\n    return x", torch.linspace(-1, 1, 22), ax,
                          title="IG", line_width=10)
    assert ax.get_title() == "IG" and ax.get_xlabel() and ax.get_ylabel()
    texts = [t.get_text() for t in ax.texts]
    assert texts[:4] == ["d", "e", "f", "\u2423"] and "\u21b5" in texts and len(texts) == 22
    with pytest.raises(ValueError, match="one number per character"):
        show_text_attribution("abc", [1.0, 2.0], ax, title="t")


def test_image_panels_draw_zero_as_black_and_wrap_long_titles():
    # The book calls the all-zero image "black": the input column must draw 0 black.
    images = torch.rand(1, 1, 8, 8)
    fig = show_image_attributions(images, {"KernelSHAP 200": torch.randn(1, 1, 8, 8),
                                           "IG": torch.randn(1, 1, 8, 8)}, title="t")
    panels = [ax for ax in fig.axes if ax.images]
    drawn = panels[0].images[0]
    np.testing.assert_allclose(drawn.to_rgba(0.0)[:3], (0.0, 0.0, 0.0))
    np.testing.assert_allclose(drawn.to_rgba(float(images.max()))[:3], (1.0, 1.0, 1.0))
    # long method names break at a space, so that neighbouring column titles keep apart
    assert [ax.get_title() for ax in panels] == ["input", "KernelSHAP\n200", "IG"]
