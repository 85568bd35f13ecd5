"""Training throughput: the real trainer (bags from HDF5) vs the same steps on tensors in memory.

Generates a few hundred bags of thousands of tiles, runs :func:`wsi_mil.mil.train.train_cv`
(2 folds, no inner validation so every epoch is pure training) and times its epochs
from the ``epoch`` callback events. The baseline runs the same model, optimiser, batch
size and tile count per bag on batches already padded in memory (on the device), i.e.
the best the data path could do. Prints

    train[cold]: ours X bags/s, in-memory Y bags/s, ratio Z      (first epoch, bags read from disk)
    train[warm]: ours X bags/s, in-memory Y bags/s, ratio Z      (later epochs, bag cache warm)

and the peak memory. Usage::

    python benchmarks/train.py [--bags 200] [--tiles 2000 4000] [--dim 384] [--epochs 3]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_mil.features.bags import read_bag
from wsi_mil.mil.data import collate_bags
from wsi_mil.mil.models import create_aggregator
from wsi_mil.mil.run import TrainConfig
from wsi_mil.mil.synthetic import make_synthetic_cohort
from wsi_mil.mil.train import resolve_device, train_cv


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(config: TrainConfig, out: Path) -> tuple[list[float], list[float], int]:
    """Train; return cold and warm epoch seconds and bags per epoch of fold 0."""
    stamps: list[tuple[int, int, float]] = []

    def on_event(event: str, info: dict) -> None:
        if event == "epoch":
            stamps.append((info["fold"], info["epoch"], time.perf_counter()))

    start = time.perf_counter()
    result = train_cv(config, out, callback=on_event)
    preds = result.predictions
    n_bags = int(((preds["fold"] == 0) & (preds["split"] == "train")).sum())
    cold, warm = [], []
    for i, (fold, epoch, t) in enumerate(stamps):
        if fold == 0 and epoch == 0:
            cold.append(t - start)  # includes validating the cohort and reading bag headers
        elif epoch > 0:  # epoch 0 of later folds would include the previous fold's predictions
            warm.append(t - stamps[i - 1][2])
    return cold, warm, n_bags


def run_in_memory(
    config: TrainConfig, bag_paths: list[Path], epochs: int, device: torch.device
) -> float:
    """Bags/s of the same training steps on batches already padded on the device.

    Runs ``epochs`` passes over the bags and returns the median rate of the passes
    after the first (warm-up), like the warm epochs of the real trainer.
    """
    rng = np.random.default_rng(0)
    bags = []
    for path in bag_paths:
        feats = read_bag(path).features
        if config.max_tiles and len(feats) > config.max_tiles:
            feats = feats[np.sort(rng.choice(len(feats), config.max_tiles, replace=False))]
        bags.append(feats)
    batches = []
    for i in range(0, len(bags), config.batch_size):
        x, m = collate_bags(bags[i : i + config.batch_size])
        batches.append((x.to(device), m.to(device), torch.randint(0, 2, (len(x),), device=device)))
    torch.manual_seed(0)
    model = create_aggregator(config.model, bags[0].shape[1], 2, **config.model_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(batches))
    model.train()
    rates = []
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, m, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x, m)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(bags) / (time.perf_counter() - t0))
    return float(np.median(rates[1:] if len(rates) > 1 else rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--tiles", type=int, nargs=2, default=(2000, 4000))
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tiles", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", help="keep the generated data here (default: a temp dir)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        syn = make_synthetic_cohort(
            root / "data", n_patients=args.bags, n_tiles=tuple(args.tiles), dims=(args.dim,)
        )
        print(
            f"generated {args.bags} bags of {args.tiles[0]}-{args.tiles[1]} tiles x {args.dim} "
            f"in {time.perf_counter() - t0:.1f}s; device {device}"
        )
        config = TrainConfig(
            task="classification",
            cohort=str(syn.cohort_csv),
            features=[str(d) for d in syn.features_dirs],
            folds=2,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_tiles=args.max_tiles,
            val_fraction=0.0,
            patience=args.epochs,
            n_boot=0,
            device=str(device),
            cache_gb=8.0,
        )
        cold, warm, n_bags = run_ours(config, root / "run")
        rss_ours = _peak_rss_mb()
        cuda_ours = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
        paths = [syn.features_dirs[0] / f"{s}.h5" for s in list(syn.planted)[:n_bags]]
        mem_rate = run_in_memory(config, paths, args.epochs, device)
        for name, times in (("cold", cold), ("warm", warm)):
            if times:
                ours = n_bags / float(np.median(times))
                print(
                    f"train[{name}]: ours {ours:.2f} bags/s, in-memory {mem_rate:.2f} bags/s, "
                    f"ratio {ours / mem_rate:.2f}"
                )
        print(
            f"peak RSS: {rss_ours:.0f} MiB after ours, {_peak_rss_mb():.0f} MiB after in-memory"
            + (f"; peak CUDA allocated (ours) {cuda_ours:.0f} MiB" if cuda_ours else "")
        )


if __name__ == "__main__":
    main()
