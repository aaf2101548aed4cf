"""A slow link on one machine: each rank in its own Linux network namespace, the link shaped by ``tc tbf``.

2 ranks are joined by one veth pair; more ranks each get a veth pair to a bridge in a hub namespace (a
switch). Every egress that carries training traffic is shaped to the rate, so both directions of every
link are slow, as on a real NIC. Latency is not shaped (``netem`` is unavailable on these machines).

The links use jumbo frames (MTU 9000) by default. On a real network the NIC moves the packets; here the
kernel does, on the same cores that train, and at MTU 1500 that per-packet work slowed the training steps
running beside a transfer by 25-40 % (32 MLP steps: 0.25 s alone, 0.34-0.37 s over a 5.3 MB all-reduce)
while at MTU 9000 it cost nothing measurable (0.265 s vs 0.264 s). The link rate is the same either way.

Everything created lives inside namespaces named ``llsgd-<pid>-*`` with private addresses (10.213.0.x), so
no traffic leaves the machine and nothing in the root namespace changes; the namespaces (and with them the
veths, bridge and qdiscs) are deleted on exit, on Ctrl-C and on SIGTERM. Without root or without ``ip``/``tc``
the lab falls back to loopback, unshaped, and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

PREFIX = "llsgd"
SUBNET = "10.213.0"
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
DEFAULT_MTU = 9000


@dataclass(frozen=True)
class RankNet:
    """Where one rank runs: its namespace (None on loopback), its address and its interface."""

    namespace: Optional[str]
    address: str
    interface: str

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv] if self.namespace else argv


def rate_bits(rate: str) -> float:
    """``"200mbit"`` -> 2e8; tc's own spelling, so the same string goes to tc."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if match is None:
        raise ValueError(f"`--link` must look like 100mbit, 1gbit or 10gbit, got {rate!r}.")
    return float(match.group(1)) * UNITS[match.group(2)]


def tbf_args(rate: str) -> list[str]:
    # tbf releases at most `burst` bytes per timer tick: 64 kB is plenty up to ~500 Mbit/s, but at 10 Gbit/s
    # it would cap the rate below the target, so the bucket holds at least 1 ms of traffic.
    burst_kb = max(64, int(rate_bits(rate) / 8 / 1000 / 1024) + 1)
    return ["tbf", "rate", rate, "burst", f"{burst_kb}kb", "latency", "50ms"]


def run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


def veth(name: str, namespace: str, peer: str, peer_namespace: str, mtu: int) -> None:
    """A veth pair created directly inside two namespaces: no interface ever appears in the root namespace."""
    run("ip", "link", "add", name, "netns", namespace, "mtu", str(mtu), "type", "veth",
        "peer", "name", peer, "netns", peer_namespace, "mtu", str(mtu))  # fmt: skip


def namespaces() -> list[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete lab namespaces left by a run that was killed hard (its pid is gone)."""
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        except PermissionError:
            pass  # alive, someone else's


def why_not_shaped() -> Optional[str]:
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get update && apt-get install -y iproute2)"
    return None


class NetLab:
    """Context manager: ``with NetLab(2, "200mbit") as lab: lab.ranks[r].wrap([...])``.

    Args:
        world_size: number of ranks.
        rate: tbf rate (``"100mbit"``, ``"1gbit"``, ...), or None for plain loopback.
        mtu: the links' MTU in bytes (1500 for Ethernet's standard frames, 9000 for jumbo frames).
    """

    def __init__(self, world_size: int, rate: Optional[str], mtu: int = DEFAULT_MTU) -> None:
        if rate is not None:
            rate_bits(rate)  # fail on a bad spelling before creating anything
        if not 576 <= mtu <= 9000:  # 9000: jumbo frames on real NICs; a 64 kB frame never fit tbf's 64 kB bucket
            raise ValueError(f"`--mtu` must be between 576 and 9000 bytes, got {mtu}.")
        self.world_size, self.rate, self.mtu = world_size, rate, mtu
        self.created: list[str] = []
        self.ranks: list[RankNet] = []
        self.notice = ""

    @property
    def shaped(self) -> bool:
        return bool(self.created)

    @property
    def master_addr(self) -> str:
        return self.ranks[0].address

    def __enter__(self) -> NetLab:
        reason = "no --link rate given" if self.rate is None else why_not_shaped()
        if reason is None:
            try:
                self._build()
            except (RuntimeError, OSError) as error:
                self._teardown()
                reason = str(error)
        if reason is not None:
            self.ranks = [RankNet(None, "127.0.0.1", "lo") for _ in range(self.world_size)]
            self.notice = f"NOTICE: loopback, link NOT shaped ({reason}); numbers are not those of a slow link."
        else:
            topology = "one veth pair" if self.world_size == 2 else "veth pairs to a bridge"
            self.notice = (
                f"network lab: {self.world_size} ranks in namespaces {PREFIX}-{os.getpid()}-*, {topology}, "
                f"MTU {self.mtu}, "
                f"every egress shaped by `tc qdisc add ... root {' '.join(tbf_args(str(self.rate)))}`"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _namespace(self, suffix: str) -> str:
        name = f"{PREFIX}-{os.getpid()}-{suffix}"
        run("ip", "netns", "add", name)
        self.created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _build(self) -> None:
        remove_stale()
        shape = tbf_args(str(self.rate))
        spaces = [self._namespace(f"r{r}") for r in range(self.world_size)]
        if self.world_size == 2:
            veth("lv0", spaces[0], "lv1", spaces[1], self.mtu)
        else:
            hub = self._namespace("hub")
            run("ip", "-n", hub, "link", "add", "llbr", "mtu", str(self.mtu), "type", "bridge")
            run("ip", "-n", hub, "link", "set", "llbr", "up")
            for r, space in enumerate(spaces):
                port = f"hp{r}"
                veth(f"lv{r}", space, port, hub, self.mtu)
                run("ip", "-n", hub, "link", "set", port, "master", "llbr")
                run("ip", "-n", hub, "link", "set", port, "up")
                run("tc", "-n", hub, "qdisc", "add", "dev", port, "root", *shape)  # the switch port toward r
        for r, space in enumerate(spaces):
            address = f"{SUBNET}.{r + 1}"
            run("ip", "-n", space, "addr", "add", f"{address}/24", "dev", f"lv{r}")
            run("ip", "-n", space, "link", "set", f"lv{r}", "up")
            run("tc", "-n", space, "qdisc", "add", "dev", f"lv{r}", "root", *shape)  # the rank's own egress
            self.ranks.append(RankNet(space, address, f"lv{r}"))

    def _teardown(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.created = []
