"""The published GPU-cluster statistics ``perf/utilisation.py`` builds its workload from.

Each table names its source; they were read from the project's derived tables of public traces
(the team's shared ``traces/`` notes), and are encoded here so that the simulation depends on
nothing outside the repository. Values marked ASSUMPTION are not in any trace we have: they are
the simulation's own choices, stated so that a reader can change them and see what follows.

Sources:
- Alibaba PAI v2020 (cluster-trace-gpu-v2020, CC BY 4.0; Weng et al., "MLaaS in the Wild",
  NSDI'22): 6,742 GPUs; task durations; 54 % of tasks ask for less than one GPU; GPUs per task;
  the hourly submission profile (read from the paper's figure, approximate); per-instance GPU
  utilisation (mean 10.5 %, median 1.5 %, 34.5 % at zero; the CDF below is the paper's figure as
  digitised in the AntMan paper, OSDI'20, whose mean is 16.3 %).
- Microsoft Philly (msr-fiddle/philly-traces, CC BY 4.0; Jeon et al., ATC'19): job durations,
  GPUs per job (82.4 % of jobs on one GPU), per-minute GPU utilisation (mean about 47 %).
- Interactive notebook sessions use their reserved GPUs for about a quarter of the time, at low
  intensity (the same notes' summary of the traces above).
"""

from __future__ import annotations

import math

# -- durations: (seconds, cumulative %) -------------------------------------------------------
# PAI v2020 and Philly job duration quantiles p10..p99. Between quantiles durations are
# log-linear; below p10 down to 1 s, above p99 up to 2 x p99 (ASSUMPTION: the traces' tails).
PAI_DURATION_QUANTILES_S: tuple[tuple[float, float], ...] = (
    (1, 0), (28, 10), (90, 25), (484, 50), (3095, 75), (11386, 90), (22677, 95), (64882, 99),
    (2 * 64882, 100),
)  # fmt: skip
PHILLY_DURATION_QUANTILES_S: tuple[tuple[float, float], ...] = (
    (1, 0), (36, 10), (108, 25), (853, 50), (3186, 75), (15822, 90), (68672, 95), (413581, 99),
    (2 * 413581, 100),
)  # fmt: skip

# -- GPU utilisation CDFs: (utilisation %, cumulative %) ---------------------------------------
# PAI: per-task GPU utilisation as digitised in AntMan (36.1 % at zero). The digitised curve
# stops at 99.7 % at 99-100 % utilisation; the last 0.3 % is put at 100 %.
PAI_UTIL_CDF: tuple[tuple[float, float], ...] = (
    (0, 0), (0, 36.1), (1, 40.8), (5, 57.0), (10, 69.6), (20, 79.7), (30, 83.8), (40, 85.8),
    (50, 86.5), (60, 87.2), (70, 88.6), (80, 90.5), (90, 92.1), (95, 95.0), (99, 99.7),
    (100, 100.0),
)  # fmt: skip
# Philly: per-minute GPU utilisation (32.2 % of minutes at zero).
PHILLY_UTIL_CDF: tuple[tuple[float, float], ...] = (
    (0, 0), (0, 32.2), (1, 32.7), (5, 34.6), (10, 36.3), (20, 39.3), (30, 42.5), (40, 46.1),
    (50, 50.8), (60, 55.8), (70, 60.4), (80, 65.4), (90, 72.5), (95, 78.5), (99, 88.9),
    (100, 100.0),
)  # fmt: skip

# -- sizes ----------------------------------------------------------------------------------
PAI_FRACTIONAL_TASKS_PCT = 54.0  # PAI v2020: tasks asking for less than one GPU
# PAI GPUs per task, cumulative % of tasks (all tasks: the fractional ones are within "<= 1").
PAI_WHOLE_GPU_COUNT_CDF: tuple[tuple[int, float], ...] = (
    (1, 97.1),
    (2, 98.6),
    (4, 99.1),
    (8, 100.0),
)
# ASSUMPTION: the fraction a fractional task asks for, uniform over the 1/20 grid below 1 (the
# trace says how many ask for less than a GPU, not how much less).
PAI_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
# Philly GPUs per job, cumulative % of jobs.
PHILLY_GPU_COUNT_CDF: tuple[tuple[int, float], ...] = (
    (1, 82.4), (2, 84.5), (4, 92.0), (8, 98.9), (16, 99.8), (32, 100.0),
)  # fmt: skip

# -- arrivals ---------------------------------------------------------------------------------
# PAI v2020: hourly task submissions relative to the daily mean, hour 0..23 (UTC+8), read from
# the paper's figure. The simulation starts at hour 0.
PAI_HOURLY_MULTIPLIER: tuple[float, ...] = (
    1.408, 0.956, 0.700, 0.596, 0.726, 0.700, 0.778, 0.947, 0.768, 0.904, 1.408, 1.450,
    1.006, 0.982, 1.254, 1.313, 1.280, 1.408, 1.049, 1.041, 0.989, 0.879, 0.784, 0.674,
)  # fmt: skip

# -- how the classes are put together (ASSUMPTIONS) ---------------------------------------------
# Reserved GPU-time that is not notebooks: PAI-style batch tasks and Philly-style exclusive
# training. PAI is mostly batch (training and inference instances of its tasks); 20 % exclusive
# multi-GPU training is our choice.
NON_NOTEBOOK_SPLIT = {"batch": 0.8, "training": 0.2}
# A batch task's device use comes in ON/OFF bursts (AntMan observed usage that fluctuates over
# time within a task). Bursts average this many device-seconds; the task's utilisation sets how
# much of its run is ON.
BATCH_BURST_MEAN_S = 300.0
# Notebook sessions: length (lognormal), cells of device work and think gaps between them.
NOTEBOOK_SESSION_MEDIAN_S = 2 * 3600.0
NOTEBOOK_SESSION_SIGMA = 0.8
NOTEBOOK_SESSION_MAX_S = 12 * 3600.0
NOTEBOOK_CELL_MEDIAN_S = 20.0
NOTEBOOK_CELL_SIGMA = 1.0
NOTEBOOK_ACTIVE_SHARE = 0.25  # published: in use about a quarter of the time ...
NOTEBOOK_INTENSITY = 0.4  # ... at low intensity (ASSUMPTION: 40 % of the device while in use)
NOTEBOOK_GAP_SIGMA = 1.5
# The think gap's lognormal mu, so that the device is busy ACTIVE_SHARE x INTENSITY of a session.
_CELL_MEAN = NOTEBOOK_CELL_MEDIAN_S * math.exp(NOTEBOOK_CELL_SIGMA**2 / 2)
_GAP_MEAN = _CELL_MEAN * (1 / (NOTEBOOK_ACTIVE_SHARE * NOTEBOOK_INTENSITY) - 1)
NOTEBOOK_GAP_MU = math.log(_GAP_MEAN) - NOTEBOOK_GAP_SIGMA**2 / 2
# The GPU memory a notebook asks for (a memory ask, as `request_gpus -m`), one of these, GiB.
NOTEBOOK_MEMORY_GIB: tuple[int, ...] = (4, 8, 8, 16)
# How long a notebook's lease may sit idle before ``ours`` releases it (seconds).
NOTEBOOK_IDLE_TIMEOUT_S = 600.0
