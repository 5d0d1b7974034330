"""User story: a plain torch ResNet-18 on CIFAR-10, quantized to W4A4 N-multipliers.

Needs the ``vision`` extra (torchvision) and CIFAR-10 already on disk (``--data-dir``, the
torchvision layout); nothing is downloaded unless ``--download`` is given. ``--fake-data``
runs the same pipeline on torchvision's FakeData (used by the tests).

    python examples/resnet18_cifar10.py --data-dir ~/data --epochs 200
"""
import argparse

import torch

from qfv_brevitas import NMultConfig, format_report, layer_report, quantize_model
from qfv_brevitas.models import resnet18_cifar
from qfv_brevitas.train import TrainConfig, evaluate, fit


def datasets(args):
    try:
        import torchvision
        import torchvision.transforms as T
    except (ImportError, RuntimeError) as e:  # CPU torch builds cannot import torchvision
        raise SystemExit(f"this example needs torchvision (pip install 'qfv-brevitas[vision]'): {e}")
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    if args.fake_data:
        tf = T.Compose([T.ToTensor(), norm])
        make = lambda n, seed: torchvision.datasets.FakeData(n, (3, 32, 32), 10, tf, random_offset=seed)
        return make(args.fake_data, 0), make(max(args.fake_data // 4, 1), 10_000)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    ds = torchvision.datasets.CIFAR10
    return (ds(args.data_dir, train=True, transform=train_tf, download=args.download),
            ds(args.data_dir, train=False, transform=test_tf, download=args.download))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--fake-data", type=int, default=0, help="use N FakeData images instead")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--fp-checkpoint", help="state dict of a trained float ResNet-18 to start from")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    args = p.parse_args(argv)
    train, test = datasets(args)
    model = resnet18_cifar(width=args.width)
    if args.fp_checkpoint:
        model.load_state_dict(torch.load(args.fp_checkpoint, map_location="cpu", weights_only=True))
    example = torch.stack([train[i][0] for i in range(min(64, len(train)))])
    q = quantize_model(model, NMultConfig(weight_bits=args.bits, act_bits=args.bits),
                       example_input=example)
    cfg = TrainConfig(epochs=args.epochs, lr=0.01, lambda_rise_epochs=min(20, args.epochs))
    fit(q, train, test, cfg, desc=f"ResNet-18 W{args.bits}A{args.bits}")
    acc = evaluate(q, test)
    print(format_report(layer_report(q)))
    print(f"test accuracy {100 * acc:.2f}%")
    return acc


if __name__ == "__main__":
    main()
