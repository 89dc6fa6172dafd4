"""What fit() returns: the merged model, the per-round history and how the run went."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_tensors
from torch import nn

from .config import TrainConfig


@dataclass
class Result:
    """What fit() returns: the merged model, the per-round history and how the run went."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: TrainConfig
    workers: int
    startup_s: float   # fit() called -> first training step
    wall_s: float      # fit() called -> fit() returned
    data_name: str = "data"

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def summary(self) -> str:
        """A table of the rounds (at most 12 rows shown) and a headline."""
        cfg = self.config
        lines = [f"unison: {cfg.strategy.spec()} on {self.data_name}, {self.workers} worker(s), "
                 f"backend={cfg.backend}, partition={cfg.partition.spec()}, "
                 f"{cfg.epochs} epoch(s), batch {cfg.batch_size}, {cfg.optimizer} lr={cfg.lr:g}"]
        columns = [("epoch", "{:>7.2f}"), ("step", "{:>6d}"), ("wall_s", "{:>7.2f}"),
                   ("train_loss", "{:>10.4f}"), ("val_loss", "{:>9.4f}"), ("val_acc", "{:>8.2%}"),
                   ("divergence", "{:>10.4f}"), ("comm_bytes", "{:>11,d}")]
        columns = [(name, fmt) for name, fmt in columns if any(name in r for r in self.history)]
        widths = [len(fmt.format(0 if "d}" in fmt else 0.0)) for _, fmt in columns]
        lines.append("  ".join(name.rjust(w) for (name, _), w in zip(columns, widths)))
        rows = self.history if len(self.history) <= 12 else self.history[:5] + [None] + self.history[-6:]
        for record in rows:
            if record is None:
                lines.append("  ".join("...".rjust(w) for w in widths))
                continue
            lines.append("  ".join(fmt.format(record[name]) if name in record else "-".rjust(w)
                                   for (name, fmt), w in zip(columns, widths)))
        final = self.final
        headline = f"done in {self.wall_s:.2f} s (start-up {self.startup_s:.2f} s)"
        if cfg.speeds is not None:  # the times include waits that simulate declared speeds
            waited = sum(r.get("simulated_wait_s", 0.0) for r in self.history)
            headline += f"; SIMULATED speeds {list(cfg.speeds)} ({waited:.2f} s waited, all workers)"
        if "val_acc" in final:
            headline += f"; final validation accuracy {final['val_acc']:.2%}"
        elif "val_loss" in final:
            headline += f"; final validation loss {final['val_loss']:.4g}"
        lines.append(headline)
        return "\n".join(lines)

    def save_model(self, path: str | Path) -> None:
        """The merged model's state_dict as safetensors (no pickle), with the mode every other
        file gets (0666 less the umask; safetensors' save_file would make it 0600)."""
        Path(path).write_bytes(save_tensors({k: v.contiguous() for k, v in self.model.state_dict().items()}))
