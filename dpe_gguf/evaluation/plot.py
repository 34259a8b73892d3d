"""Heatmap of a divisor table (``dpe-gguf inspect --plot``). matplotlib is imported only here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dpe_gguf.errors import DPEError


def plot_divisor_table(table: np.ndarray, path: str | os.PathLike[str], title: str = "") -> Path:
    """Draw ``table`` (shape ``(n_layer, n_head_kv, F)``) as layers x (KV head, frequency), colour =
    log2 of the divisor, and save it as PNG at ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        raise DPEError("--plot needs matplotlib: pip install matplotlib") from None
    n_layer, n_head_kv, n_freq = table.shape
    flat = table.reshape(n_layer, n_head_kv * n_freq)
    vmax = max(float(flat.max()), 2.0)
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * flat.shape[1], 24), min(2 + 0.22 * n_layer, 16)))
    image = ax.imshow(flat, aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=LogNorm(vmin=1.0, vmax=vmax), origin="upper")
    for h in range(1, n_head_kv):
        ax.axvline(h * n_freq - 0.5, color="white", linewidth=1.0)
    ax.set_xticks([h * n_freq + n_freq / 2 - 0.5 for h in range(n_head_kv)],
                  [f"KV head {h}\n(f = 0..{n_freq - 1})" for h in range(n_head_kv)])
    ax.set_ylabel("layer")
    ax.set_title(title or "DPE divisor table sigma(layer, KV head, f)")
    ticks = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= vmax]
    cbar = fig.colorbar(image, ax=ax, ticks=ticks)
    cbar.ax.set_yticklabels([str(v) for v in ticks])
    cbar.set_label("position divisor")
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, format="png", dpi=100)
    except OSError as e:
        raise DPEError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out
