"""Train a small Vision Transformer with diagonal layers on MNIST.

With no flags: ViT on 7x7 patches (16 tokens + a class token), width 64, 4 blocks of 4
heads, MLP ratio 2; every qkv, attention-output and MLP linear is a 90%-sparse diagonal layer
with fixed random diagonals (``--method static``; ``dynadiag``, ``rigl`` and ``set`` train the
structure too); the patch embedding and the head stay dense. 16 epochs of AdamW (lr 3e-3,
weight decay 0.05) with a one-epoch warm-up and cosine decay, batch 128, label smoothing 0.1,
and each training image shifted by up to 2 pixels along each axis (``--shift``, drawn anew
every epoch). ``--shift 0`` trains without the shifts; the run before these defaults
(8 epochs, lr 2e-3, no label smoothing, no shifts) is
``--epochs 8 --lr 2e-3 --label-smoothing 0 --shift 0``.

    python examples/train_vit_mnist.py
    python examples/train_vit_mnist.py --method dynadiag --epochs 12
    python examples/train_vit_mnist.py --linear dense

Writes to ``--out`` (default ``runs/mnist_vit``) the same files as ``train_mnist_mlp.py``.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common.py

import diagnet as dn  # noqa: E402
from diagnet import optim  # noqa: E402
from diagnet.dst import sparsify  # noqa: E402
from diagnet.models import ViT  # noqa: E402
from diagnet.train import Trainer  # noqa: E402

import common  # noqa: E402

EXAMPLE = "train_vit_mnist"  # the name in the run's config, checked by --resume


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser, epochs=16, lr=3e-3, batch_size=128, out="runs/mnist_vit")
    parser.set_defaults(method="static")
    parser.add_argument("--dim", type=common.positive_int, default=64)
    parser.add_argument("--depth", type=common.positive_int, default=4)
    parser.add_argument("--heads", type=common.positive_int, default=4)
    parser.add_argument("--mlp-ratio", type=common.positive_int, default=2)
    parser.add_argument("--weight-decay", type=common.non_negative_number, default=0.05)
    parser.add_argument("--label-smoothing", type=common.fraction, default=0.1,
                        help="of the loss's targets (the logged eval_loss too; default: 0.1)")
    parser.add_argument("--shift", type=common.non_negative_int, default=2,
                        help="shift each training image by up to this many pixels along each "
                             "axis, drawn anew every epoch (default: 2; 0: no augmentation)")
    args = common.parse_args(parser, argv, EXAMPLE, smoke={"depth": 1, "dim": 32})
    started = time.perf_counter()
    device = common.pick_device(parser, args.device)
    train, test, source = common.mnist_loaders(args, flatten=False, device=device)
    print(f"data: {source}; device {device}")

    model = ViT(image_size=28, patch_size=7, in_channels=1, dim=args.dim, depth=args.depth,
                heads=args.heads, mlp_ratio=args.mlp_ratio, num_classes=10, rng=args.seed,
                dtype=args.dtype, device=device)
    controller = None
    if args.linear != "dense":
        controller = sparsify(model, args.linear, args.sparsity, method=args.method,
                              dense=("patch_embed.proj", "head"), count_dense=False,
                              rng=args.seed, **common.controller_options(args, len(train)))
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(train) * args.epochs
    scheduler = optim.WarmupCosine(optimizer, warmup_steps=min(len(train), steps // 4),
                                   total_steps=steps)
    config = common.run_config(args, EXAMPLE)
    print(dn.nn.summary(model))

    loss_fn = functools.partial(dn.cross_entropy, label_smoothing=args.label_smoothing)
    trainer = Trainer(model, optimizer, train, loss_fn=loss_fn, eval_loader=test,
                      scheduler=scheduler, scheduler_interval="step", controller=controller,
                      epochs=args.epochs, out_dir=args.out, best_metric="eval_accuracy",
                      seed=args.seed, config=config, progress=not args.no_progress,
                      overwrite=args.overwrite)
    common.compile_kernels(model, optimizer, train, test)
    return common.fit_and_report(trainer, model, args, started)

if __name__ == "__main__":
    sys.exit(main())
