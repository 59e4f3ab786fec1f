"""Where each step reads and writes: one place, shared by the CLI, the flow and dvc.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import PathsConfig


@dataclass(frozen=True)
class Layout:
    raw_dir: Path
    artifacts: Path

    @classmethod
    def from_config(cls, paths: PathsConfig, root: Path | None = None) -> Layout:
        root = root or Path.cwd()
        return cls(root / paths.raw_dir, root / paths.artifacts_dir)

    @property
    def ingest_dir(self) -> Path:
        return self.artifacts / "ingest"

    @property
    def history_dir(self) -> Path:
        """Earlier raw data versions checked out for a training window (ingest.window)."""
        return self.artifacts / "raw-history"

    @property
    def vocab_path(self) -> Path:
        return self.ingest_dir / "vocab.parquet"

    def split_dir(self, split: str) -> Path:
        return self.ingest_dir / split

    @property
    def validate_dir(self) -> Path:
        return self.artifacts / "validate"

    @property
    def validate_report_html(self) -> Path:
        return self.validate_dir / "report.html"

    @property
    def validate_report_text(self) -> Path:
        return self.validate_dir / "report.txt"

    @property
    def validate_history_dir(self) -> Path:
        """Training statistics of each data version, `<data version>/*.stats.binpb`."""
        return self.artifacts / "validate_history"

    @property
    def train_dir(self) -> Path:
        return self.artifacts / "train"

    @property
    def model_path(self) -> Path:
        return self.train_dir / "model.keras"

    @property
    def history_path(self) -> Path:
        """Per-epoch training metrics (`history.json`, one list per logged name)."""
        return self.train_dir / "history.json"

    @property
    def evaluate_dir(self) -> Path:
        return self.artifacts / "evaluate"

    @property
    def metrics_path(self) -> Path:
        return self.evaluate_dir / "metrics.json"

    @property
    def headline_path(self) -> Path:
        """The DVC metrics file: the headline AUCs, the verdict, the champion's and deltas."""
        return self.evaluate_dir / "headline.json"

    @property
    def by_position_path(self) -> Path:
        return self.evaluate_dir / "by_position.json"

    @property
    def by_position_table(self) -> Path:
        """The per-position figures as a CSV table (a DVC plot: `dvc plots show`)."""
        return self.evaluate_dir / "by_position.csv"

    @property
    def ingest_report_path(self) -> Path:
        return self.ingest_dir / "report.json"

    @property
    def validate_summary_path(self) -> Path:
        return self.validate_dir / "report.json"

    @property
    def registration_path(self) -> Path:
        return self.register_dir / "registration.json"

    @property
    def plots_dir(self) -> Path:
        return self.evaluate_dir / "plots"

    @property
    def register_dir(self) -> Path:
        return self.artifacts / "register"

    @property
    def oracle_path(self) -> Path:
        return self.raw_dir / "oracle.json"
