"""The one plot of the training curves: loss, accuracy and validation scratch recall per epoch. train.py saves
it as training_curves.png; report.py puts it in report.pdf from training_log.csv."""
from __future__ import annotations

from pathlib import Path


def training_curves_figure(log_rows: list[dict]):
    """A matplotlib figure of log_rows (dicts of epoch, train_loss, train_acc, val_loss, val_acc, val_recall)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in log_rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in log_rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in log_rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in log_rows], "o-", label="train accuracy")
    ax_acc.plot(epochs, [r["val_acc"] for r in log_rows], "o-", label="validation accuracy")
    ax_acc.plot(epochs, [r["val_recall"] for r in log_rows], "s--", label="validation scratch recall")
    ax_acc.set(xlabel="epoch", title="Accuracy", ylim=(min(0.5, ax_acc.get_ylim()[0]), 1.01))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(log_rows: list[dict], path: Path) -> None:
    """Save training_curves_figure(log_rows) as a PNG, atomically (temp file, then rename)."""
    import matplotlib.pyplot as plt

    fig = training_curves_figure(log_rows)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
