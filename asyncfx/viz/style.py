"""Colours and matplotlib helpers shared by every view."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from asyncfx.errors import AsyncFXError
from asyncfx.passes.meta import ValueClass

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: Colours of the value classes in every view.
VALUE_CLASS_COLORS = {ValueClass.LATENT: "#d62728", ValueClass.STEP: "#1f77b4",
                      ValueClass.STATIC: "#7f7f7f"}
#: Colour of groups that no stage owns (step/static work each stage replicates).
REPLICATED_COLOR = "#c7c7c7"
#: Colours of boundary tensors in ``plot_cut_bytes``.
MAIN_PATH_COLOR, SKIP_COLOR = "#1f77b4", "#ff7f0e"


def stage_colors(n_stages: int) -> list[str]:
    """One distinct colour per stage (matplotlib's tab10, then tab20), as hex strings."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10" if n_stages <= 10 else "tab20"]
    return [to_hex(palette(k % palette.N)) for k in range(n_stages)]


def axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    require_matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise AsyncFXError("asyncfx.viz draws with matplotlib, which is not installed; "
                           "pip install 'asyncfx[viz]'.") from exc


def legend_patches(colors: Mapping[str, str]) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(color=c, label=label) for label, c in colors.items()]

