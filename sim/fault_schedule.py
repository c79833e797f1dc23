"""Fault schedules as files: `archipelago chaos --faults FILE`, and the presets' `faults.schedule`.

A schedule is a TOML file (configs/faults-ci.toml, configs/faults-etcd.toml,
configs/faults-two-kills-zombie.toml are examples):

    jitter = "3%"              # optional: every `at` given in % moves by up to ± this, drawn with the seed

    [[fault]]
    kind = "kill_island"       # one of KINDS
    at = "15%"                 # "N%" of the expected run (the fault-free run's time), or seconds
    target = "drawn-1"         # see below; the default depends on the kind
    duration = 1.0             # seconds (or "N%"); the default is the kind's [faults] setting
    # when = "merging"         # kill_coordinator: at the leader's next commit; kill_island: "checkpointed"

Targets: an island ("island-2"), several (["island-0", "island-1"]: hit at the same moment), an
island drawn with the run's seed ("drawn-1", "drawn-2", …: distinct islands, the same name the same
island), "leader" (the coordinator leading when the fault starts) or "standby" (one that does not
lead; needs etcd), "etcd". Durations by kind: how long a killed island or coordinator stays down
before it is started again (kill_island, kill_coordinator; term_coordinator: until the stopped one
is started again as a standby), a link stays cut (partition), an island runs at 1/5 speed (slow),
etcd stays down (kill_etcd, etcd_outage), the leader's link to etcd drops everything
(cut_leader_etcd), the coordinator stays SIGSTOPped (pause_coordinator: long enough and a standby
takes over, and the paused one wakes as a zombie whose lease is gone).

`when = "merging"` times a kill_coordinator to a phase: from `at` on, the injector watches the
leader's state directory and kills it as soon as it is writing a commit (the outer step applied in
memory, its delta or checkpoint under a temporary name, the store transaction not made yet).
`when = "checkpointed"` holds a kill_island from `at` on until every island it kills has a local
checkpoint (`diloco.local_checkpoint_every`) it could resume from: written since it started and
after the last push the coordinator answered it. A schedule meant to test resuming then lands
neither before the first checkpoint is on disk nor in the moment between a push's answer and the
checkpoint that counts it (a replacement would pull θ_b, and say why).

Drawing a schedule (`draw`) turns fractions into seconds, applies the jitter and picks the drawn
islands, all from one `random.Random(seed)`: the islands first, then each fault's jitter in file
order. The same file, seed and expected time give the same faults.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from archipelago import config as cfglib
from archipelago.config import ConfigError

KINDS = ("kill_island", "partition", "kill_coordinator", "pause_coordinator", "slow", "corrupt", "kill_etcd",
         "etcd_outage", "cut_leader_etcd", "term_coordinator")
ISLAND_KINDS = ("kill_island", "partition", "slow", "corrupt")
COORDINATOR_KINDS = ("kill_coordinator", "pause_coordinator", "term_coordinator", "cut_leader_etcd")
ETCD_KINDS = ("kill_etcd", "etcd_outage", "cut_leader_etcd")
NEEDS_ETCD = ETCD_KINDS + ("pause_coordinator",)  # a paused leader is a zombie only where a standby takes over
WHEN = {"kill_coordinator": ("merging",), "kill_island": ("checkpointed",)}
ROLES = ("leader", "standby")


@dataclass
class FaultSpec:
    """One `[[fault]]` entry: `at` and `duration` in seconds, or fractions of the expected run."""

    kind: str
    at_s: float | None = None
    at_fraction: float | None = None
    targets: list[str] = field(default_factory=list)
    duration_s: float | None = None
    duration_fraction: float | None = None
    when: str = ""


@dataclass
class Fault:
    """One fault of a drawn schedule, and what happened when it was injected."""

    kind: str
    at_s: float  # seconds after the run's training started
    target: str | list[str]  # "island-I", several islands, "leader", "standby" or "etcd"
    duration_s: float = 0.0
    when: str = ""  # kill_coordinator: "merging", at the leader's next commit; kill_island: "checkpointed"
    injected_at_s: float | None = None
    ended_at_s: float | None = None  # restart / heal / link restored
    recovered: bool = False
    recovered_at_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


@dataclass
class Schedule:
    faults: list[FaultSpec]
    jitter: float = 0.0  # a fraction of the expected run
    source: str = ""


def _time(value: Any, where: str) -> tuple[float | None, float | None]:
    """(seconds, fraction) from `12.5` or `"12.5s"` or `"15%"`."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be seconds or \"N%\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
        if seconds < 0:
            raise ConfigError(f"{where} must be >= 0, got {value!r}")
        return seconds, None
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                fraction = float(text[:-1]) / 100
                if fraction < 0:
                    raise ValueError
                return None, fraction
            if text.endswith("s"):
                return _time(float(text[:-1]), where)
        except ValueError:
            pass
    raise ConfigError(f"{where} must be seconds (12.5 or \"12.5s\") or a percentage of the expected run "
                      f"(\"15%\"), got {value!r}")


def _targets(kind: str, value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return ["etcd"] if kind in ("kill_etcd", "etcd_outage") else ["leader"] if kind in COORDINATOR_KINDS else []
    targets = [value] if isinstance(value, str) else value
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{where}.target must be a name or a list of names, got {value!r}")
    for t in targets:
        if kind in ISLAND_KINDS and not (t.startswith("island-") or t.startswith("drawn-")):
            raise ConfigError(f"{where}.target {t!r}: a {kind} hits islands (\"island-I\", \"drawn-K\")")
        if kind in COORDINATOR_KINDS and (t not in ROLES or len(targets) > 1):
            raise ConfigError(f"{where}.target {t!r}: a {kind} hits one coordinator, \"leader\" or \"standby\"")
        if kind == "cut_leader_etcd" and t != "leader":
            raise ConfigError(f"{where}.target {t!r}: cut_leader_etcd cuts the leader's link to etcd")
        if kind in ("kill_etcd", "etcd_outage") and t != "etcd":
            raise ConfigError(f"{where}.target {t!r}: a {kind} hits \"etcd\"")
        for prefix in ("island-", "drawn-"):
            if t.startswith(prefix) and not (t[len(prefix):].isdigit() and (prefix == "island-" or int(t[6:]) >= 1)):
                raise ConfigError(f"{where}.target {t!r}: expected {prefix}N")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{where}.target names an island twice: {targets}")
    return targets


def parse_schedule(table: dict[str, Any], source: str) -> Schedule:
    unknown = sorted(set(table) - {"jitter", "fault"})
    if unknown:
        raise ConfigError(f"fault schedule {source}: unknown key(s) {unknown} (expected jitter and [[fault]] entries)")
    entries = table.get("fault", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"fault schedule {source}: faults are [[fault]] tables")
    jitter = 0.0
    if "jitter" in table:
        seconds, fraction = _time(table["jitter"], f"fault schedule {source}: jitter")
        if fraction is None:
            raise ConfigError(f"fault schedule {source}: jitter is a percentage of the expected run, e.g. \"3%\"")
        jitter = fraction
    faults = []
    for i, entry in enumerate(entries):
        where = f"fault schedule {source}: fault {i + 1}"
        extra = sorted(set(entry) - {"kind", "at", "target", "duration", "when"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {extra} (expected kind, at, target, duration, when)")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if "at" not in entry:
            raise ConfigError(f"{where} ({kind}) has no `at`")
        at_s, at_fraction = _time(entry["at"], f"{where}.at")
        duration_s = duration_fraction = None
        if "duration" in entry:
            duration_s, duration_fraction = _time(entry["duration"], f"{where}.duration")
        when = entry.get("when", "")
        if when and when not in WHEN.get(kind, ()):
            allowed = "; ".join(f"{k}: {', '.join(v)}" for k, v in WHEN.items())
            raise ConfigError(f"{where}: `when` is for {' and '.join(WHEN)} only ({allowed}); got {when!r} "
                              f"for {kind}")
        faults.append(FaultSpec(kind, at_s, at_fraction, _targets(kind, entry.get("target"), where), duration_s,
                                duration_fraction, when))
    return Schedule(faults, jitter, source)


def schedule_path(name: str) -> Path:
    """A schedule named like a preset (`faults-ci`, under configs/) or a path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else cfglib.configs_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"fault schedule {name!r} not found ({path})")
    return path


def load_schedule(name: str) -> Schedule:
    path = schedule_path(name)
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"fault schedule {path} is not valid TOML: {exc}") from exc
    return parse_schedule(table, str(path))


def check(schedule: Schedule, islands: int, etcd: bool, local_checkpoints: bool = True) -> None:
    """What a schedule needs of the run: islands that exist, etcd (a standby) where it says so, local
    checkpoints where a kill waits for one."""
    for i, spec in enumerate(schedule.faults):
        where = f"fault schedule {schedule.source}: fault {i + 1} ({spec.kind})"
        for t in spec.targets:
            if t.startswith("island-") and int(t[7:]) >= islands:
                raise ConfigError(f"{where}: {t} does not exist (the run has {islands} islands)")
            if t.startswith("drawn-") and int(t[6:]) > islands:
                raise ConfigError(f"{where}: {t}: the run has only {islands} islands to draw from")
        if not etcd and (spec.kind in NEEDS_ETCD or "standby" in spec.targets):
            raise ConfigError(f"{where} needs a standby coordinator on etcd: faults.failover = etcd (or auto with "
                              "an etcd binary on PATH)")
        if spec.when == "checkpointed" and not local_checkpoints:
            raise ConfigError(f"{where}: when = \"checkpointed\" waits for a local checkpoint, and the run takes "
                              "none: set diloco.local_checkpoint_every")


def draw(schedule: Schedule, seed: int, islands: int, expected_s: float, durations: dict[str, float]) -> list[Fault]:
    """The schedule's faults for one run, in time order (sim/run_faults.py carries them out).

    `durations`: each kind's default duration in seconds, for entries that give none."""
    rng = random.Random(seed)
    drawn = sorted({int(t[6:]) for spec in schedule.faults for t in spec.targets if t.startswith("drawn-")})
    picks = rng.sample(range(islands), k=min(islands, max(3, len(drawn))))

    def name(target: str) -> str:
        return f"island-{picks[(int(target[6:]) - 1) % len(picks)]}" if target.startswith("drawn-") else target

    faults = []
    for spec in schedule.faults:
        jitter = rng.uniform(-schedule.jitter, schedule.jitter)
        # every fault draws its jitter; it moves only those placed by a fraction of the run
        at = spec.at_s if spec.at_s is not None else max(0.0, spec.at_fraction + jitter) * expected_s
        if spec.duration_s is not None:
            duration = spec.duration_s
        elif spec.duration_fraction is not None:
            duration = spec.duration_fraction * expected_s
        else:
            duration = durations[spec.kind]
        targets = [name(t) for t in spec.targets]
        faults.append(Fault(spec.kind, round(at, 2), targets[0] if len(targets) == 1 else targets,
                            round(duration, 2), when=spec.when))
    return sorted(faults, key=lambda f: f.at_s)


def dump(faults: list[Fault], jitter: float = 0.0) -> str:
    """A schedule file holding exactly `faults` (seconds, targets by name): a drawn run, replayable."""
    lines = [f'jitter = "{jitter * 100:g}%"', ""] if jitter else []
    for f in faults:
        target = f.target if isinstance(f.target, str) else "[" + ", ".join(f'"{t}"' for t in f.target) + "]"
        if isinstance(f.target, str):
            target = f'"{target}"'
        lines += ["[[fault]]", f'kind = "{f.kind}"', f"at = {f.at_s}", f"target = {target}", f"duration = {f.duration_s}"]
        if f.when:
            lines.append(f'when = "{f.when}"')
        lines.append("")
    return "\n".join(lines)


__all__ = ["KINDS", "Fault", "FaultSpec", "Schedule", "check", "draw", "dump", "load_schedule", "parse_schedule"]
