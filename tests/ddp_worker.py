"""Run by tests/test_distributed.py under torchrun: a tiny CTMQ run (mode "run":
`ctmq train`'s RunConfig, with or without SyncBatchNorm; mode "fit": a user's
converted model through ctmq.engine.fit); every rank saves its weights after
each stage it trains as <out>/rank<r>.safetensors."""

import os
import sys

from safetensors.torch import save_file

from ctmq.engine import RunConfig, run


class SaveEachRank:
    def __init__(self, out):
        self.path = os.path.join(out, f"rank{os.environ['RANK']}.safetensors")

    def stage_end(self, sched, index, model, metrics):
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, self.path)


def fit_user_model(out):
    import torch
    from torch import nn

    from ctmq import data
    from ctmq.engine import Schedule, TrainConfig, fit, make_loaders
    from ctmq.engine.trainer import init_distributed
    from ctmq.nn import convert

    info = init_distributed("cpu")
    torch.manual_seed(info.rank)  # each rank builds other weights: fit starts all from rank 0's
    model = convert(
        nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 24, 3, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.Hardtanh(),
            nn.Conv2d(24, 24, 3, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(24, 10),
        )
    )
    loaders = make_loaders(data.load("digits"), 128, info, seed=0)  # a shard per rank
    fit(
        model,
        *loaders,
        Schedule.ctmq(2, 1, 1, 1),
        out,
        config=TrainConfig(progress=False),
        device="cpu",
        callback=SaveEachRank(out),
    )


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "fit":
        fit_user_model(out)
        sys.exit(0)
    sync_bn = mode == "1"
    cfg = RunConfig(
        dataset="digits",
        width=0.125,
        start_bits=2,
        target_bits=1,
        cycles=1,
        epochs_per_stage=1,
        batch_size=128,
        progress=False,
        out=out,
        device="cpu",
        sync_bn=sync_bn,
        schedule="ctmq",
    )
    run(cfg, callback=SaveEachRank(out))
