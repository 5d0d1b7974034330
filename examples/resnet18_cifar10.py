"""User story: a plain torch ResNet-18 on CIFAR-10, quantized to W4A4 N-multipliers.

Needs the ``vision`` extra (torchvision) and CIFAR-10 already on disk (``--data-dir``, the
torchvision layout); nothing is downloaded unless ``--download`` is given. ``--fake-data N``
runs the same pipeline (the project's CIFAR-shaped ResNet-18, W4A4 QAT, report) on N images
generated here, with no torchvision and no data set (used by the tests).

    python examples/resnet18_cifar10.py --data-dir ~/data --epochs 200
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from qfv_brevitas import NMultConfig, format_report, layer_report, quantize_model
from qfv_brevitas.zoo.models import resnet18_cifar
from qfv_brevitas.training.train import TrainConfig, evaluate, fit


def generated_cifar(n: int, seed: int, classes: int = 10) -> TensorDataset:
    """``n`` CIFAR-shaped images ``(3, 32, 32)`` made here, standardised: each class is a fixed
    smooth colour pattern (a random 4x4 image, upsampled; the same for every ``seed``), each
    image its class's pattern plus pixel noise of the pattern's own spread. Learnable, unlike
    random labels, so a short run shows whether the pipeline trains."""
    g = torch.Generator().manual_seed(12345)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=32,
                              mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + templates.std() * torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset((x - templates.mean()) / (templates.std() * 2 ** 0.5), y)


def datasets(args):
    if args.fake_data:
        return generated_cifar(args.fake_data, 0), generated_cifar(max(args.fake_data // 4, 1), 1)
    try:
        import torchvision
        import torchvision.transforms as T
    except (ImportError, RuntimeError) as e:  # CPU torch builds cannot import torchvision
        raise SystemExit(f"CIFAR-10 needs torchvision (pip install 'qfv-brevitas[vision]'; "
                         f"--fake-data N runs without it): {e}")
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    ds = torchvision.datasets.CIFAR10
    return (ds(args.data_dir, train=True, transform=train_tf, download=args.download),
            ds(args.data_dir, train=False, transform=test_tf, download=args.download))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--fake-data", type=int, default=0,
                   help="use N generated CIFAR-shaped images instead (no torchvision needed)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--fp-checkpoint", help="state dict of a trained float ResNet-18 to start from")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, test = datasets(args)
    torch.manual_seed(args.seed)
    model = resnet18_cifar(width=args.width)
    if args.fp_checkpoint:
        model.load_state_dict(torch.load(args.fp_checkpoint, map_location="cpu", weights_only=True))
    example = torch.stack([train[i][0] for i in range(min(64, len(train)))])
    q = quantize_model(model, NMultConfig(weight_bits=args.bits, act_bits=args.bits),
                       example_input=example)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      lambda_rise_epochs=min(20, args.epochs))
    fit(q, train, test, cfg, desc=f"ResNet-18 W{args.bits}A{args.bits}")
    acc = evaluate(q, test)
    print(format_report(layer_report(q)))
    print(f"test accuracy {100 * acc:.2f}%")
    return acc, q


if __name__ == "__main__":
    main()
