"""Files a Beam pipeline's remote workers must reach: copied through Beam's filesystems.

A worker of a Flink, Spark or Dataflow cluster does not see the launching machine's disk.
With a staging folder on a filesystem every worker reaches (`gs://`, `s3://`, `hdfs://`,
or a folder mounted on every machine), the launcher copies the inputs there with Beam's
own `FileSystems`, the pipeline reads and writes only staged paths, and the launcher copies
the results back and deletes the folder. With no staging folder the paths are used as
they are: right for the DirectRunner and for workers on this machine.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

_CHUNK = 16 << 20  # bytes per read while copying


class Staging:
    """One run's staging folder (`root`/esmm-<random>), or none when `root` is empty."""

    def __init__(self, root: str):
        self.folder = f"{root.rstrip('/')}/esmm-{uuid.uuid4().hex[:12]}" if root else ""

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def put(self, local: Path, name: str | None = None) -> str:
        """The path the workers read `local` at (copied into the folder when staging)."""
        if not self.folder:
            return str(local)
        from apache_beam.io.filesystems import FileSystems

        remote = FileSystems.join(self.folder, name or Path(local).name)
        with open(local, "rb") as src, FileSystems.create(remote) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        return remote

    def path(self, local: Path, name: str | None = None) -> str:
        """The path a pipeline writes what becomes `local` at (see `get`)."""
        if not self.folder:
            return str(local)
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.join(self.folder, name or Path(local).name)

    def get(self, remote: str, local: Path) -> Path:
        """Copy a staged result back to `local` (nothing to do without staging)."""
        if self.folder:
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(remote) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        return Path(local)

    def match(self, pattern: str) -> list[str]:
        """The files matching a glob (Beam's filesystems: staged or local), sorted."""
        from apache_beam.io.filesystems import FileSystems

        found = FileSystems.match([pattern])[0].metadata_list
        return sorted(m.path for m in found)

    def cleanup(self) -> None:
        """Delete the staging folder, if any."""
        if self.folder:
            from apache_beam.io.filesystems import FileSystems

            if FileSystems.exists(self.folder):
                FileSystems.delete([self.folder])
