"""The suite's table as a PNG bar chart (needs matplotlib: ``pip install matplotlib``)."""

from __future__ import annotations

from order_sidecar.core.errors import ConfigError

from order_sidecar_tools.bench.rows import SuiteRow


def draw_chart(path: str, rows: list[SuiteRow]) -> None:
    """Bars of events/s per setting and mode, each labelled with its ratio to its baseline
    (or, for rows without one, its p99)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ConfigError(
            "--chart needs matplotlib: pip install matplotlib (or leave --chart out)"
        ) from error
    labels = [f"{row.setting} | {row.row.mode}" for row in rows]
    rates = [row.row.events_per_s for row in rows]
    figure, axes = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    bars = axes.barh(range(len(rows)), rates, color="#4c72b0")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("events/s (higher is better)")
    axes.set_title("order-sidecar bench --suite (ratio to each row's baseline)")
    for bar, row in zip(bars, rows, strict=True):
        axes.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            _label(row),
            va="center",
            fontsize=7,
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _label(row: SuiteRow) -> str:
    if row.ratio is not None:
        return f" {row.ratio:.2f}x {row.baseline}"
    return f" p99 {row.row.call_p99_ms:.1f} ms"
