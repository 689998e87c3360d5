"""A discrete-event simulator of a disaggregated multi-model cluster (SUN shared decode pool vs. per-model decode
GPUs), driven by measured or analytic step-time profiles. Importable without torch."""

from loadgen.sim.cluster import POLICIES, ClusterConfig, SimResult, allocate, simulate
from loadgen.sim.profile import Profile, Roofline, analytic_profile, constant_profile, load_profile

__all__ = [
    "POLICIES",
    "ClusterConfig",
    "Profile",
    "Roofline",
    "SimResult",
    "allocate",
    "analytic_profile",
    "constant_profile",
    "load_profile",
    "simulate",
]
