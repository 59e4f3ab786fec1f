"""Raw-data versioning with DVC: the data version of a run, and making the raw data present.

The data version is the md5 that `data.dvc` records for the raw folder. On a fresh clone
there is no remote to pull from, so the default data set is regenerated: generation is
deterministic, so it reproduces exactly the version `data.dvc` names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.config import SynthConfig


class DataVersionError(RuntimeError):
    """The raw data is missing or does not match the version recorded in its .dvc file."""


def dvc_file_for(raw_dir: Path, repo_root: Path) -> Path:
    """The `.dvc` file that versions a raw folder: `<repo_root>/<folder name>.dvc`."""
    return Path(repo_root) / f"{Path(raw_dir).name}.dvc"


def data_version(dvc_file: Path) -> str:
    """The md5 recorded in a `.dvc` file for its (single) output."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        raise DataVersionError(f"{dvc_file}: not found; version the raw data with `dvc add`")
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataVersionError(f"{dvc_file}: expected one output with an md5, found {outs!r}")
    return str(outs[0]["md5"])


def _matches(repo, dvc_file: Path, version: str) -> bool:
    """Hash the workspace copy (caching it) and compare with the recorded version.

    `dvc commit` hashes what is there; DVC's state database makes a repeated check cheap. The
    .dvc file itself is left exactly as it was.
    """
    recorded = dvc_file.read_text()
    try:
        repo.commit(str(dvc_file), force=True)
        return data_version(dvc_file) == version
    finally:
        dvc_file.write_text(recorded)


def _push(repo, dvc_file: Path) -> None:
    from dvc.exceptions import DvcException

    try:
        repo.push(targets=[str(dvc_file)])
    except DvcException as err:  # a missing remote must not stop a local run
        print(f"note: could not push {dvc_file} to the DVC remote: {err}")


@dataclass(frozen=True)
class RawData:
    version: str  # the md5 recorded in the .dvc file
    source: str  # "workspace", "remote" (dvc pull), "generator" or "added" (esmm data add)


def ensure_raw_data(repo_root: Path, raw_dir: Path, synth: SynthConfig) -> RawData:
    """Make the raw data named by `<raw_dir>.dvc` present; say its version and where it came from.

    An existing raw folder must match the recorded version (it is never overwritten). A
    missing one is restored with `dvc pull` from the default remote or, failing that,
    regenerated with the seeded generator; either way it is checked against the recorded
    md5, cached, and pushed to the remote.

    Raises:
        DataVersionError: the folder differs from the recorded version, or neither the
            remote nor the generator yields it.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from aliccp.synth import synthesize_ali_ccp

    raw_dir = Path(raw_dir)
    dvc_file = dvc_file_for(raw_dir, repo_root)
    version = data_version(dvc_file)
    repo = Repo(str(repo_root))
    if raw_dir.exists() and any(raw_dir.iterdir()):
        if not _matches(repo, dvc_file, version):
            raise DataVersionError(
                f"{raw_dir} differs from the version recorded in {dvc_file} ({version}): "
                f"version it with `dvc add {raw_dir.name}`, or restore it with `dvc checkout {dvc_file.name}`"
            )
        _push(repo, dvc_file)
        return RawData(version, "workspace")
    # DVC warns that the files are in no cache nor remote, under empty progress bars: expected
    # on a fresh clone, where the generator makes them next, so not shown.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            repo.pull(targets=[str(dvc_file)])
        if not repo.status(targets=[str(dvc_file)]):
            return RawData(version, "remote")
    except DvcException:
        pass  # no remote, or the remote lacks this version: regenerate below
    finally:
        logging.disable(logging.NOTSET)
    synthesize_ali_ccp(raw_dir, synth.train, synth.test, synth.seed, profile=synth.profile)
    if not _matches(repo, dvc_file, version):
        raise DataVersionError(
            f"{raw_dir}: regenerated data (synth {synth.train}/{synth.test}, seed {synth.seed}) does not "
            f"match {dvc_file} ({version}); if the data changed on purpose, run `dvc add {raw_dir.name}`"
        )
    _push(repo, dvc_file)
    return RawData(version, "generator")


def add_raw_data(repo_root: Path, raw_dir: Path, source: Path, link: bool = False) -> RawData:
    """Make the files in `source` the new raw data version: copy (or hard-link) them into
    `raw_dir`, `dvc add` it, and push it to the default remote.

    `source` must be a complete Ali-CCP folder (the four files, plain or `.gz`, or the two
    published archives); the current raw folder is replaced only once the copy is complete.

    Raises:
        IngestError: `source` lacks a raw file (the message names it).
        DataVersionError: a raw file is not in the Ali-CCP format (`sniff_raw_files`);
            nothing is copied and the data version is unchanged.
    """
    from dvc.repo import Repo

    source, raw_dir = Path(source), Path(raw_dir)
    sniff_raw_files(source)
    incoming = raw_dir.with_name(f".{raw_dir.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(source, incoming, copy_function=os.link if link else shutil.copy2)
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    incoming.rename(raw_dir)
    repo = Repo(str(repo_root))
    repo.add(str(raw_dir))
    dvc_file = dvc_file_for(raw_dir, repo_root)
    _push(repo, dvc_file)
    return RawData(data_version(dvc_file), "added")


SNIFF_BYTES = 1 << 16  # of each raw file, read before anything is copied
SNIFF_MAX_BAD = 0.5  # a file whose sniffed lines are mostly bad is not Ali-CCP data


def sniff_raw_files(source: Path) -> None:
    """Check that the four raw files of a folder look like Ali-CCP data: the first lines of
    each are parsed by the ingest parser (a later bad line is ingestion's quarantine's job).

    Raises:
        IngestError: a raw file is missing.
        DataVersionError: a file cannot be read (e.g. not really gzip) or is empty, or most
            of its first lines are not in its format; the message names the file and why.
    """
    from tasks.ingest import find_raw_files, parse_block

    for sources in find_raw_files(source).values():
        for raw, kind in zip(sources, ("skeleton", "common"), strict=True):
            try:
                with raw.open() as fh:
                    block = fh.read(SNIFF_BYTES)
                    complete = len(block) < SNIFF_BYTES or not fh.read(1)
            except (OSError, EOFError) as err:
                raise DataVersionError(f"{raw}: cannot be read ({err}); {_UNCHANGED}") from None
            if not complete:  # whole lines only
                block = block[: block.rfind(b"\n") + 1]
            if not block.strip():
                raise DataVersionError(f"{raw}: no {kind} lines; {_UNCHANGED}")
            parsed = parse_block(block, 0, kind)
            bad = len(parsed.bad_reasons)
            if bad > SNIFF_MAX_BAD * max(parsed.n_lines, 1):
                reason = max(set(parsed.bad_reasons), key=parsed.bad_reasons.count)
                raise DataVersionError(
                    f"{raw}: not an Ali-CCP {kind} file: {bad} of its first {parsed.n_lines} "
                    f"lines are bad (mostly: {reason}); {_UNCHANGED}"
                )


_UNCHANGED = "nothing was added and the data version is unchanged"


@dataclass(frozen=True)
class DataVersion:
    md5: str
    rev: str | None  # the git commit that recorded it (None: the uncommitted workspace .dvc)


def version_history(repo_root: Path, dvc_file: Path) -> list[DataVersion]:
    """Distinct data versions of `dvc_file`, newest first: the workspace's, then each one
    recorded in git history (`git log -- <dvc_file>`)."""
    import subprocess

    repo_root, dvc_file = Path(repo_root), Path(dvc_file)
    versions = [DataVersion(data_version(dvc_file), None)]
    rel = dvc_file.resolve().relative_to(repo_root.resolve()).as_posix()
    log = subprocess.run(
        ["git", "log", "--format=%H", "--", rel], cwd=repo_root, capture_output=True, text=True
    )
    for rev in log.stdout.split() if log.returncode == 0 else []:
        shown = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=repo_root, capture_output=True, text=True
        )
        if shown.returncode:
            continue  # the file was deleted in that commit
        outs = (yaml.safe_load(shown.stdout) or {}).get("outs") or []
        md5 = outs[0].get("md5") if len(outs) == 1 else None
        if md5 and all(v.md5 != md5 for v in versions):
            versions.append(DataVersion(str(md5), rev))
    return versions


def training_window(
    repo_root: Path, raw_dir: Path, window: int, cache_dir: Path
) -> list[tuple[str, Path]]:
    """The `window - 1` data versions before the current one, as `(label, folder)` for
    `ingest_ali_ccp(history=...)`: each is checked out once from the DVC cache (or the
    remote) into `cache_dir/<md5>/`.

    Raises:
        DataVersionError: fewer earlier versions exist than the window asks for, or one
            cannot be retrieved.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    raw_dir = Path(raw_dir)
    dvc_file = dvc_file_for(raw_dir, repo_root)
    earlier = version_history(repo_root, dvc_file)[1:window]
    if len(earlier) < window - 1:
        raise DataVersionError(
            f"ingest.window = {window} needs {window - 1} earlier versions of {dvc_file.name} in "
            f"git history, found {len(earlier)}; commit each new data version (git commit "
            f"{dvc_file.name}) or lower the window"
        )
    out = []
    for version in earlier:
        folder = Path(cache_dir) / version.md5.removesuffix(".dir")
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                fs = DVCFileSystem(str(repo_root), rev=version.rev)
                fs.get(raw_dir.name, str(folder), recursive=True)
            except (DvcException, OSError) as err:
                raise DataVersionError(
                    f"cannot retrieve data version {version.md5} (commit {version.rev[:8]}) of "
                    f"{raw_dir.name}/ from the DVC cache or remote: {err}"
                ) from err
            (folder / ".complete").touch()
        out.append((version.md5[:8], folder))
    return out
