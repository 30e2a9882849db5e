"""Static images of mechq's Plotly figures: PNGs for the README, the docs and the notebooks.

Plotly exports static images through kaleido (``pip install 'mechq[static]'``), which drives a
Chrome or Chromium it does not ship: Debian's ``chromium`` package works offline
(``apt-get install chromium``; ``$BROWSER_PATH`` points kaleido at another one). One browser is
started on the first export and reused for the rest of the process.

:func:`available` says whether this machine can export; :func:`show` is what the notebooks call
on a figure: a PNG (which renders on a code host, where Plotly's JavaScript does not) when it
can, else the interactive figure itself.
"""

from __future__ import annotations

import atexit
import functools
import warnings
from pathlib import Path

import plotly.graph_objects as go

WIDTH, HEIGHT = 900, 450  # pixels of an exported figure unless the caller says otherwise


@functools.cache
def available() -> bool:
    """True when kaleido is installed and finds a Chrome / Chromium to drive."""
    try:
        import kaleido  # noqa: F401
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return False
    return Chromium.find_browser(skip_local=False) is not None


@functools.cache
def _server() -> None:
    """Start kaleido's browser once for this process (stopped at exit)."""
    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    atexit.register(kaleido.stop_sync_server, silence_warnings=True)


def png(fig: go.Figure, width: int = WIDTH, height: int = HEIGHT, scale: float = 1.0) -> bytes:
    """The figure as PNG bytes; a clear error where no static export is possible."""
    if not available():
        raise RuntimeError("static export needs kaleido and a Chrome/Chromium: "
                           "pip install 'mechq[static]' and apt-get install chromium "
                           "(or set BROWSER_PATH).")
    _server()
    with warnings.catch_warnings():  # plotly passes options a running server ignores
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        return fig.to_image(format="png", width=width, height=height, scale=scale)


def write_png(fig: go.Figure, path: str | Path, width: int = WIDTH, height: int = HEIGHT,
              scale: float = 1.0) -> Path:
    """Write the figure as a PNG file and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(fig, width, height, scale))
    return path


def show(fig: go.Figure, width: int = WIDTH, height: int = HEIGHT):
    """A notebook cell's display of ``fig``: a static PNG where :func:`available`, else the
    interactive figure."""
    if not available():
        return fig
    from IPython.display import Image

    return Image(png(fig, width, height), width=width, height=height)
