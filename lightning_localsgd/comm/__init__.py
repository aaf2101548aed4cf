"""Communication: communicators over a process group or simulated workers, flat buckets, counters."""

from lightning_localsgd.comm.communicator import Communicator, ProcessGroupCommunicator, ring_all_reduce_bytes
from lightning_localsgd.comm.flat import FlatParameters, average_float_buffers, average_gradients
from lightning_localsgd.comm.grad_sync import GradientAverager
from lightning_localsgd.comm.simulated import SimulatedCommunicator, SimulatedGroup, run_simulated
from lightning_localsgd.comm.stats import CommStats

__all__ = [
    "CommStats",
    "Communicator",
    "FlatParameters",
    "GradientAverager",
    "ProcessGroupCommunicator",
    "SimulatedCommunicator",
    "SimulatedGroup",
    "average_float_buffers",
    "average_gradients",
    "ring_all_reduce_bytes",
    "run_simulated",
]
