"""The accuracy/diversity trade-off of `remi-train evaluate --diversity`, as a table and a plot."""

from __future__ import annotations

from pathlib import Path


def tradeoff_table(points: list[dict[str, float]], n: int = 50) -> str:
    """Markdown table of `evaluate_diversity` results, one row per lambda."""
    lines = [
        f"| lambda | Recall@{n} | HitRate@{n} | Diversity@{n} |",
        "|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['lambda']:g} | {p[f'recall@{n}']:.4f} | {p[f'hitrate@{n}']:.4f} "
            f"| {p[f'diversity@{n}']:.4f} |"
        )
    return "\n".join(lines)


def tradeoff_plot(points: list[dict[str, float]], path: Path, title: str, n: int = 50) -> Path:
    """Recall@n and HitRate@n against Diversity@n, each point labelled with its lambda (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diversity = [p[f"diversity@{n}"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, marker in ((f"recall@{n}", "o"), (f"hitrate@{n}", "s")):
        values = [p[metric] for p in points]
        ax.plot(diversity, values, marker=marker, label=metric.replace("@", " @"))
        for p, x, y in zip(points, diversity, values, strict=True):
            ax.annotate(f"{p['lambda']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)  # fmt: skip
    ax.set_xlabel(f"diversity@{n} (share of item pairs in different categories)")
    ax.set_ylabel("test metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
