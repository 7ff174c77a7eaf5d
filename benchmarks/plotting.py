"""One figure of side-by-side panels (one per format), shared by the studies."""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import matplotlib.pyplot as plt  # a headless machine gets the Agg backend by itself

# A line: (label, x values, y values, dashed). Non-finite y values are left out.
Line = tuple[str, Sequence[float], Sequence[float], bool]


def panels(lines: dict[str, list[Line]], path: pathlib.Path, *, xlabel: str, ylabel: str,
           xscale: str = "linear", sharey: bool = True, zero_line: bool = False) -> None:
  """Writes one panel per key of ``lines`` (its title) to ``path``."""
  fig, axes = plt.subplots(1, len(lines), figsize=(6 * len(lines), 4.5), sharey=sharey,
                           squeeze=False)
  for ax, (title, panel) in zip(axes[0], lines.items()):
    for label, x, y, dashed in panel:
      ax.plot(x, [v if v is not None and math.isfinite(v) else math.nan for v in y],
              marker="o", ms=3, label=label, ls="--" if dashed else "-")
    if zero_line:
      ax.axhline(0.0, color="k", lw=0.8)
    ax.set(xscale=xscale, title=title, xlabel=xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0, 0].set_ylabel(ylabel)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
