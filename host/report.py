"""Writing results: JSON, markdown tables, PNG plots and the generated sections of docs."""

import json
import re
from pathlib import Path

__all__ = ["markdown_table", "plot_curves", "publish", "update_doc_section", "write_json"]


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def publish(out_dir, stem, data, md, docs=None, section=None):
    """A benchmark's results: ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` and, with
    ``docs``, its ``section`` of that markdown file (default: ``bench-<stem>``)."""
    write_json(Path(out_dir) / f"{stem}.json", data)
    (Path(out_dir) / f"{stem}.md").write_text(md)
    if docs:
        update_doc_section(docs, section or f"bench-{stem}", md)


def markdown_table(rows, columns):
    """A GitHub markdown table. ``columns`` is a list of ``(header, key, format)``."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in columns) + " |"
            for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def update_doc_section(path, name, text):
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in a doc."""
    path = Path(path)
    doc = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"{path}: no section markers {begin} ... {end}")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text.rstrip()}\n{end}", doc))


def plot_curves(path, panels, ylabel="test accuracy"):
    """Line plots of per-epoch curves: ``panels`` maps a title to ``{label: [y per epoch]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for label, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
