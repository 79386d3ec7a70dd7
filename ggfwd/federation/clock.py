"""Simulated time: how long a round takes on the devices a federation is made of.

A client's round time is what its device profile predicts for the work it really did, plus its messages:

    download bytes / down bandwidth + forward passes x seconds per pass (for the tokens of each pass)
    + upload bytes / up bandwidth + round-trip latency

(`ggfwd.profiles` holds the speed model behind `seconds_per_pass`). A round lasts until its slowest included
client has reported, or until its deadline when some client would be later than that. Wall-clock (CPU) time
of the simulation itself is measured and reported separately.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientTime:
    download: float
    compute: float
    upload: float
    latency: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload + self.latency


def client_time(profile, model, down_bytes: int, up_bytes: int, tokens: int, passes: int,
                outputs: int | None = None) -> ClientTime:
    """Simulated seconds of one client's round on `profile` for `model` (ModelStats): `passes` forward passes
    over `tokens` tokens in all, each scoring `outputs` positions."""
    per_pass = profile.seconds_per_pass(model, max(1, round(tokens / passes)), outputs) if passes else 0.0
    return ClientTime(profile.download_seconds(down_bytes), passes * per_pass, profile.upload_seconds(up_bytes),
                      profile.latency_s)


def round_time(times: list[float], deadline: float) -> float:
    """The round ends when the last on-time client reports, or at the deadline if anyone is late."""
    if not times:
        return deadline if deadline != float("inf") else 0.0
    late = any(t > deadline for t in times)
    return deadline if late else max(times)
