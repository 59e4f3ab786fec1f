"""A drifting day-by-day series of synthetic Ali-CCP data sets (`esmm synth --days N`).

One world is drawn for the whole series, larger than a single day's: its extra items and
users are born day by day. Every day then writes an ordinary raw folder (`day-01/`,
`day-02/`, ...: both splits, ground truth and `oracle.json`, as `synthesize_ali_ccp`
writes), drawn from that day's version of the world:

- **churn**: each day a share `churn` of the living items and users retires (never to
  return) and as many new ones are born, with ids no earlier day used (the first item of
  each category never retires, so every category keeps one);
- **drift**: each item's log-popularity and its click and conversion logit effects take a
  Gaussian random-walk step of standard deviation `drift` per day;
- the logit biases are recalibrated each day, so the click and conversion rates stay at the
  profile's, except on the bad day;
- **the bad day** (`bad_day`, optional) is written broken in one of `BAD_KINDS`:
  `click_shift` adds `CLICK_SHIFT` to the click logit (about twice the click rate, which the
  validation's label-drift check refuses) and `defects` writes `BAD_DEFECT_RATE` of its
  lines with a defect (ingestion's quarantine threshold refuses it). The bad day still
  advances the world, so the next day is an ordinary day.

The series is deterministic from the seed: the world, layout and pilot use the seed's own
streams, and day d's contexts, chunks, defects and context keys a seed derived from
`(seed, DAY_STREAM, d)`. `days.json` at the top lists each day's folder, seed, alive,
born and retired items and users, the bad kind and the oracle AUCs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aliccp.synth.defects import DEFECT_KINDS, resolve_defects
from aliccp.synth.generate import SynthSummary, write_data_set
from aliccp.synth.profiles import SynthProfile, resolve_profile
from aliccp.synth.simulate import calibrate
from aliccp.synth.streams import PILOT_STREAM, WORLD_STREAM, stream_rng
from aliccp.synth.world import World, WorldSizes, _GroupSampler, build_world, layout

DAY_STREAM = 9  # (9, day): a day's churn, drift and derived seed
DAYS_FILE = "days.json"
BAD_KINDS = ("click_shift", "defects")
CLICK_SHIFT = 0.8  # added to the click logit on a `click_shift` day
BAD_DEFECT_RATE = 0.05  # share of defective lines on a `defects` day (quarantine limit: 0.01)


def day_dir_name(day: int) -> str:
    """The folder of day `day` (1-based) under the series' folder."""
    return f"day-{day:02d}"


@dataclass(frozen=True)
class DayRecord:
    """One day of the series, as `days.json` lists it."""

    day: int
    folder: str
    seed: int
    items_alive: int
    items_born: int
    items_retired: int
    users_alive: int
    bad: str | None
    oracle: dict


@dataclass
class _Population:
    """Which entities of one kind live, and the pool not yet born."""

    alive: np.ndarray  # bool per entity
    next_unborn: int
    protected: int  # entities 0 .. protected - 1 never retire

    def step(self, churn: float, rng: np.random.Generator) -> tuple[int, int]:
        """Retire a share `churn` of the living (not protected), then bear as many new ones
        (at most what the pool holds); returns (born, retired)."""
        candidates = np.flatnonzero(self.alive[self.protected :]) + self.protected
        retire = candidates[rng.random(len(candidates)) < churn]
        self.alive[retire] = False
        born = min(len(retire), len(self.alive) - self.next_unborn)
        self.alive[self.next_unborn : self.next_unborn + born] = True
        self.next_unborn += born
        return born, len(retire)


def _check_series(days: int, churn: float, drift: float, bad_day: int | None, bad_kind: str):
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    if not 0.0 <= churn < 1.0:
        raise ValueError(f"churn must be in [0, 1), got {churn!r}")
    if not drift >= 0.0:
        raise ValueError(f"drift must be non-negative, got {drift!r}")
    if bad_day is not None and not 1 <= bad_day <= days:
        raise ValueError(f"bad_day must be a day of the series (1 .. {days}), got {bad_day!r}")
    if bad_kind not in BAD_KINDS:
        raise ValueError(f"bad_kind must be one of {', '.join(BAD_KINDS)}, got {bad_kind!r}")


def _universe(n_train: int, days: int, churn: float, prof: SynthProfile) -> WorldSizes:
    """A day's world sizes, with room for the items and users born over the series."""
    base = WorldSizes.for_train_size(n_train, prof)
    room = churn * (days - 1) * 1.2 + 0.01  # 1.2 and 0.01: retirements are random draws
    return dataclasses.replace(
        base,
        items=base.items + math.ceil(base.items * room),
        users=base.users + math.ceil(base.users * room),
    )


def _item_popularity(world: World) -> np.ndarray:
    """Each item's popularity weight, read back from the world's item sampler."""
    sampler = world.item_sampler
    weight = np.empty(len(sampler.members))
    weight[sampler.members] = np.diff(sampler.cumulative, prepend=0.0)
    return weight


def synthesize_days(
    out_dir: Path,
    days: int,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    profile: str | SynthProfile = "default",
    churn: float = 0.05,
    drift: float = 0.1,
    bad_day: int | None = None,
    bad_kind: str = "click_shift",
    progress: Callable[[str], None] | None = None,
) -> list[DayRecord]:
    """Write a drifting series of `days` raw Ali-CCP folders and `days.json`.

    Args:
        out_dir: the series' folder; day d goes to `out_dir/day-dd/` (see `day_dir_name`).
        days: number of days (at least 1).
        n_train: train impressions per day; the first day's world is sized from it.
        n_test: test impressions per day.
        seed: non-negative seed; the same arguments give byte-identical files.
        profile: a name from `PROFILES` or a `SynthProfile`.
        churn: share of living items and users replaced each day, in [0, 1).
        drift: standard deviation of the daily step of item log-popularity and of the item
            click and conversion logit effects.
        bad_day: the day (1-based) written broken, or None.
        bad_kind: how the bad day is broken, from `BAD_KINDS`.
        progress: called with one line per day written.

    Returns:
        One record per day (also written to `days.json`).

    Raises:
        ValueError: an argument is out of range; the message names it.
    """
    _check_series(days, churn, drift, bad_day, bad_kind)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    prof = resolve_profile(profile)
    base = WorldSizes.for_train_size(n_train, prof)
    sizes = _universe(n_train, days, churn, prof)
    ids = layout(sizes, seed)
    world = build_world(sizes, prof, stream_rng(seed, WORLD_STREAM, 0))
    items = _Population(np.arange(sizes.items) < base.items, base.items, base.categories)
    users = _Population(np.arange(sizes.users) < base.users, base.users, 0)
    popularity = np.log(_item_popularity(world))
    item_ctr, item_cvr = world.item_ctr.copy(), world.item_cvr.copy()
    activity = world.user_activity

    out_dir = Path(out_dir)
    records = []
    for day in range(1, days + 1):
        rng = stream_rng(seed, DAY_STREAM, day)
        day_seed = int(
            np.random.SeedSequence(seed, spawn_key=(DAY_STREAM, day)).generate_state(1)[0]
        )
        born = retired = 0
        if day > 1:
            born, retired = items.step(churn, rng)
            users.step(churn, rng)
            popularity += rng.normal(0.0, drift, sizes.items)
            item_ctr += rng.normal(0.0, drift, sizes.items)
            item_cvr += rng.normal(0.0, drift, sizes.items)
        user_weight = activity * users.alive
        today = dataclasses.replace(
            world,
            item_ctr=item_ctr.copy(),
            item_cvr=item_cvr.copy(),
            item_sampler=_GroupSampler.build(
                world.item_category, np.exp(popularity) * items.alive, sizes.categories
            ),
            user_activity=user_weight / user_weight.sum(),
        )
        bias_ctr, bias_cvr = calibrate(today, stream_rng(seed, PILOT_STREAM, day))
        bad = bad_kind if day == bad_day else None
        if bad == "click_shift":
            bias_ctr += CLICK_SHIFT
        rate, kinds = (
            (BAD_DEFECT_RATE, resolve_defects(BAD_DEFECT_RATE, DEFECT_KINDS))
            if (bad == "defects")
            else (0.0, ())
        )
        summary = write_data_set(
            out_dir / day_dir_name(day),
            today,
            (bias_ctr, bias_cvr),
            ids,
            (n_train, n_test),
            day_seed,
            rate,
            kinds,
        )
        records.append(_record(day, day_seed, items, users, born, retired, bad, summary))
        if progress is not None:
            progress(_describe(records[-1]))
    (out_dir / DAYS_FILE).write_text(
        json.dumps([dataclasses.asdict(r) for r in records], indent=2) + "\n"
    )
    return records


def _record(
    day: int,
    day_seed: int,
    items: _Population,
    users: _Population,
    born: int,
    retired: int,
    bad: str | None,
    summary: SynthSummary,
) -> DayRecord:
    return DayRecord(
        day=day,
        folder=day_dir_name(day),
        seed=day_seed,
        items_alive=int(items.alive.sum()),
        items_born=born,
        items_retired=retired,
        users_alive=int(users.alive.sum()),
        bad=bad,
        oracle={split: dict(values) for split, values in summary.oracle.items()},
    )


def _describe(record: DayRecord) -> str:
    """One progress line for a day written."""
    test = record.oracle.get("test", {})
    auc = test.get("ctr_auc")
    return (
        f"{record.folder}: {record.items_alive:,} items (+{record.items_born:,} "
        f"-{record.items_retired:,}), {record.users_alive:,} users"
        + (f", oracle test ctr_auc {auc:.4f}" if auc is not None else "")
        + (f"  [bad day: {record.bad}]" if record.bad else "")
    )


def read_days(series_dir: Path) -> list[DayRecord]:
    """The records of a series written by `synthesize_days` (its `days.json`).

    Raises:
        FileNotFoundError: `series_dir` holds no `days.json`.
    """
    path = Path(series_dir) / DAYS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no day series here (write one with esmm synth --days N)")
    return [DayRecord(**row) for row in json.loads(path.read_text())]
