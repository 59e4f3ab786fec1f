"""The data and provenance of the ingestion benchmark (`benchmarks.ingest`).

Owns the raw Ali-CCP text the runs read (generated once by `aliccp.synth`, cached under
`--work` by size, profile, seed and the profile's definition), the code measured (the
working copy, or a commit exported by `git archive`, with the hash of its ingestion code),
the `ingest` settings overridden on the command line, and the sizes of outputs on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.ingest_measure import INGEST_CODE, ingest_code_sha256
from benchmarks.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
RAW_NAMES = (
    "sample_skeleton_train.csv",
    "common_features_train.csv",
    "sample_skeleton_test.csv",
    "common_features_test.csv",
)
PREFERRED_PROFILE = "realistic"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_bytes(path: Path, suffix: str | None = None) -> int:
    """Bytes of a file, or of every file under a folder (only names ending in `suffix`)."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (suffix is None or p.name.endswith(suffix))
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unavailable: {err}"


def code_state(src: Path | None = None) -> dict:
    """What `ours` runs: the working copy (commit + uncommitted changes) or an exported commit."""
    if src is not None:
        return {
            "source": f"commit exported to {src}",
            "commit": (src / "COMMIT").read_text().strip(),
            "tasks_ingest_uncommitted": False,
            "uncommitted": [],
            "tasks_ingest_sha256": ingest_code_sha256(src / "tasks"),
        }
    dirty = _git("status", "--porcelain", "--", "tasks", "params.yaml")
    return {
        "source": "working copy",
        "commit": _git("rev-parse", "HEAD"),
        "tasks_ingest_uncommitted": bool(_git("status", "--porcelain", "--", *INGEST_CODE)),
        "uncommitted": dirty.splitlines() if dirty else [],
        "tasks_ingest_sha256": ingest_code_sha256(REPO / "tasks"),
    }


def export_commit(ref: str, work: Path) -> Path:
    """`git archive` of ref under work (reused when already there); returns the folder."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if sha.startswith("unavailable"):
        sys.exit(f"--ref {ref!r}: {sha}")
    src = work / f"src-{sha[:12]}"
    if not (src / "COMMIT").is_file():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        (src / "COMMIT").write_text(sha + "\n")
    return src


def resolve_profile(requested: str | None) -> tuple[str, str | None]:
    from aliccp.synth import PROFILES

    if requested:
        if requested not in PROFILES:
            sys.exit(f"--profile {requested!r} not in aliccp.synth.PROFILES {sorted(PROFILES)}")
        return requested, None
    if PREFERRED_PROFILE in PROFILES:
        return PREFERRED_PROFILE, None
    return "default", (
        f"profile {PREFERRED_PROFILE!r} not in aliccp.synth.PROFILES {sorted(PROFILES)} "
        "when this ran: fell back to 'default' (far fewer behaviour entries per context)"
    )


def prepare_raw(work: Path, n_train: int, n_test: int, seed: int, profile: str) -> dict:
    """Generate (or reuse) the raw files; returns their description."""
    from aliccp import synth

    definition = repr(synth.PROFILES[profile])
    key = hashlib.sha256(definition.encode()).hexdigest()[:10]
    raw = work / f"raw-{profile}-{n_train}-{n_test}-seed{seed}-{key}"
    marker = raw / "bench-raw.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        print(f"reusing raw data in {raw}", file=sys.stderr, flush=True)
        return info
    if raw.exists():
        shutil.rmtree(raw)  # an earlier generation was interrupted
    print(
        f"generating {n_train:,} + {n_test:,} impressions ({profile}) in {raw} ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    summary = synth.synthesize_ali_ccp(raw, n_train, n_test, seed, profile=profile)
    info = {
        "dir": str(raw),
        "profile": profile,
        "profile_definition": definition,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "counts": {s: vars(c) for s, c in summary.counts.items()},
        "synth_seconds": round(time.perf_counter() - start, 1),
        "synth_sha256": _sha256(Path(synth.__file__)),
        "generated": machine_info()["date"],
    }
    info["bytes"] = {name: (raw / name).stat().st_size for name in RAW_NAMES}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(f"generated in {info['synth_seconds']} s", file=sys.stderr, flush=True)
    return info


def parse_overrides(pairs: list[str]) -> dict:
    """`--ingest KEY=VALUE` settings as a dict (values read as YAML); exits on a bad pair."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--ingest {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def params_with(params: Path, overrides: dict, dest: Path) -> Path:
    """A copy of the params file with `ingest` settings overridden (validated by the child)."""
    import yaml

    raw = yaml.safe_load(params.read_text()) or {}
    raw["ingest"] = {**(raw.get("ingest") or {}), **overrides}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest
