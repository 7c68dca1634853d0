"""The floor: the same federated training as the app, in one plain PyTorch loop.

Same data, partition, model, method hooks, local loop, seeds and cohorts as a
``fedlt`` run, but clients train one after another in this process and the
server averages with a few lines of torch — no Flower, no Ray, no messages.
Used by ``benchmarks/speed.py`` as the reference time, and handy to try a
setting quickly.  Prints one line per round.

    python benchmarks/plain_loop.py --run-config "method='fedavg' num-server-rounds=3" --num-clients 10
    python benchmarks/plain_loop.py --run-config "method='redgrape' device='cuda'"   # on a GPU

Everything computes on the run config's ``device`` (``auto``: a GPU if one is visible), as the app's
ServerApp and ClientApp do.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import tomllib

import torch

from fedlt_app.config import resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data import tail_classes
from fedlt_app.methods import ClientReport, get_method
from fedlt_app.metrics import evaluate
from fedlt_app.strategy import sample_cohort
from fedlt_app.task import client_seed, initial_model, resolve_device
from fedlt_app.train import LocalTraining, train_locally


def parse_overrides(text: str) -> dict:
    return tomllib.loads("\n".join(text.split())) if text.strip() else {}


def run(overrides: dict, num_clients: int) -> list[dict]:
    cfg = resolve(overrides)
    data = federated_data(cfg, num_clients)
    method = get_method(cfg.method)
    global_model = initial_model(cfg, data).to(resolve_device(cfg.device))
    server = method.server(cfg, global_model, data)
    worker = copy.deepcopy(global_model)
    tail = tail_classes(data.class_counts)
    setup = LocalTraining.from_config(cfg)
    rows = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        started = time.perf_counter()
        payload = server.broadcast(server_round, global_model)
        states, reports = [], []
        for pid in sample_cohort(num_clients, cfg.clients_per_round, cfg.seed, server_round):
            images, labels = data.client_data(pid)
            worker.load_state_dict(global_model.state_dict())
            seed = client_seed(cfg.seed, server_round, pid)
            torch.manual_seed(seed)
            client = method.client(cfg, data.num_classes, payload)
            stats = train_locally(worker, images, labels, client, setup, torch.Generator().manual_seed(seed))
            states.append(({k: v.clone() for k, v in worker.state_dict().items()}, stats.num_examples))
            reports.append(ClientReport(pid, stats.num_examples, client.report()))
        weights = server.aggregation_weights(server_round, reports) or [n for _, n in states]
        server.absorb(server_round, reports)
        total = float(sum(weights))
        old = global_model.state_dict()
        new = {k: sum(w / total * s[k].double() for (s, _), w in zip(states, weights)) for k in old}
        global_model.load_state_dict({k: old[k] + cfg.server_lr * (new[k] - old[k]) for k in old})
        train_seconds = time.perf_counter() - started
        result = evaluate(server.evaluation_model(global_model), *data.test_data(), cfg.dataset, tail,
                          data.class_counts)
        rows.append({"round": server_round, "accuracy": result.accuracy, "tail_accuracy": result.tail_accuracy,
                     "train_seconds": train_seconds, "round_seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", default="")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(parse_overrides(args.run_config), args.num_clients)


if __name__ == "__main__":
    main()
