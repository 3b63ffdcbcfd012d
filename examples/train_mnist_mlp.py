"""Train a diagonally sparse MLP on MNIST: the main example.

With no flags: MLP 784-256-256-10 whose two hidden layers are 90%-sparse diagonal layers
trained by DynaDiag (sparse mode: 10% of the diagonals plus a 25% candidate pool are stored;
cosine temperature 5 -> 0.5 over 3 epochs, then frozen to the hard top-K), dense classifier
head, Adam (lr 3e-3, cosine decay), batch 128, 10 epochs. Downloads MNIST on first use (or
takes it from the offline source) into the cache folder.

    python examples/train_mnist_mlp.py                          # DynaDiag, 90% diagonal
    python examples/train_mnist_mlp.py --method rigl            # diagonal RigL
    python examples/train_mnist_mlp.py --linear unstructured --method rigl
    python examples/train_mnist_mlp.py --linear dense
    python examples/train_mnist_mlp.py --resume                 # continue the run in --out
    python examples/train_mnist_mlp.py --overwrite              # replace the run in --out

Writes to ``--out`` (default ``runs/mnist_mlp``): ``log.jsonl``, ``last.safetensors`` and
``best.safetensors``, ``learning_curves.png`` and ``diagonal_activity.png`` (with matplotlib).
An earlier run there is never replaced without ``--overwrite``; ``--resume`` continues it
with its own flags.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common.py

import diagnet as dn  # noqa: E402
from diagnet import optim  # noqa: E402
from diagnet.dst import sparsify  # noqa: E402
from diagnet.models import MLP  # noqa: E402
from diagnet.train import Trainer  # noqa: E402

import common  # noqa: E402

EXAMPLE = "train_mnist_mlp"  # the name in the run's config, checked by --resume


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser, epochs=10, lr=3e-3, batch_size=128, out="runs/mnist_mlp")
    parser.add_argument("--hidden", type=common.positive_int, nargs="+", default=[256, 256])
    args = common.parse_args(parser, argv, EXAMPLE, smoke={"hidden": [32, 32]})
    started = time.perf_counter()
    device = common.pick_device(parser, args.device)
    train, test, source = common.mnist_loaders(args, flatten=True, device=device)
    print(f"data: {source}; device {device}")

    model = MLP(784, args.hidden, 10, rng=args.seed, dtype=args.dtype, device=device)
    controller = None
    if args.linear != "dense":
        options = common.controller_options(args, len(train))
        controller = sparsify(model, args.linear, args.sparsity, method=args.method,
                              dense=("head",), count_dense=False, rng=args.seed, **options)
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    scheduler = optim.CosineAnnealingLR(optimizer, T_max=args.epochs)
    config = common.run_config(args, EXAMPLE)
    print(dn.nn.summary(model))

    trainer = Trainer(model, optimizer, train, eval_loader=test, scheduler=scheduler,
                      controller=controller, epochs=args.epochs, out_dir=args.out,
                      best_metric="eval_accuracy", seed=args.seed, config=config,
                      progress=not args.no_progress, overwrite=args.overwrite)
    common.compile_kernels(model, optimizer, train, test)
    return common.fit_and_report(trainer, model, args, started)

if __name__ == "__main__":
    sys.exit(main())
