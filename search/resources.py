"""Where trials run: the local Ray (or a cluster) and what each trial is given."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray
import torch

from analysis.command import command
from planning.settings import SearchSettings
from search.storage import check_cluster_storage
from trainable.errors import UserError


@dataclass(frozen=True)
class Resources:
    gpus: int  # total GPUs for a local Ray
    cpus: int  # total CPUs for a local Ray
    trial: dict[str, float]  # {"cpu": c, "gpu": g} per trial


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_resources(s: SearchSettings, gpus_visible: int | None = None) -> Resources:
    """The resource flags' defaults filled in, checked against this machine (their own bounds were checked
    when the settings were parsed)."""
    gpus = (visible_gpus() if gpus_visible is None else gpus_visible) if s.gpus is None else s.gpus
    if s.gpus_per_trial is not None and s.gpus_per_trial > gpus and not s.address:
        raise UserError(f"--gpus-per-trial {s.gpus_per_trial} is more than --gpus {gpus}: lower it or raise --gpus")
    gpt = s.gpus_per_trial if s.gpus_per_trial is not None else (1.0 if gpus > 0 else 0.0)
    cpt = s.cpus_per_trial if s.cpus_per_trial is not None else (2 if gpus > 0 else 1)
    cpus = os.cpu_count() or 1
    if cpt > cpus and not s.address:
        raise UserError(f"--cpus-per-trial {cpt} is more than this machine's {cpus} CPUs: lower it")
    return Resources(gpus=gpus, cpus=cpus, trial={"cpu": cpt, "gpu": gpt})


def start_ray(s: SearchSettings, res: Resources) -> None:
    """A local Ray with `res.gpus` GPUs (logical ones where there is no CUDA), or join --address."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")  # one copy of a warning repeated by every trial
    if s.address:
        ray.init(address=s.address, logging_level=logging.WARNING, log_to_driver=False)
        try:  # before any trial starts: a node-local folder would lose other nodes' checkpoints
            note = check_cluster_storage(s.storage_path, ray.nodes(), s.storage_shared)
        except UserError:
            ray.shutdown()
            raise
        if note:
            print(note)
        return
    if s.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the Ray dashboard listens on {s.dashboard_host}: anyone who can reach that "
              f"address and has the token can submit code to this cluster")
    port = dashboard_port(s.dashboard_host, s.dashboard_port)
    # address="local": always a new local Ray, never one a stray `ray start` left running
    ctx = ray.init(address="local", num_cpus=res.cpus, num_gpus=res.gpus, include_dashboard=True,
                   dashboard_host=s.dashboard_host, dashboard_port=port,
                   logging_level=logging.WARNING, log_to_driver=False)
    if ctx.dashboard_url:
        print(f"Ray dashboard: http://{ctx.dashboard_url}  (login token: {command('ray', 'get-auth-token')})")


def dashboard_port(host: str, port: int | None) -> int | None:
    """The dashboard_port for ray.init: None lets Ray bind 8265 or the next free one itself (two searches
    starting at once never pick the same port); a given port that is taken: 0, any free one."""
    if port is None or port == 0:
        return port
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return port
        except OSError:  # another search (or Ray) holds it
            print(f"the Ray dashboard takes a free port: {port} is taken (another search?)")
            return 0
