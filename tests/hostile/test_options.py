"""Hostile option values (issue 22): impossible devices, thread and worker counts, unknown
``QFV_KERNELS``, seeds and counts beyond what torch, numpy and scikit-learn take, NaN and
infinite numbers, empty paths, across the commands. Each is refused before any work: one line
naming the option (argparse's own refusals included), exit 2, nothing written, in bounded time
and memory (they were tracebacks, an abort in libgomp, a sklearn message naming a parameter
``qfv`` does not have, or a run on a device that does not exist).
"""
from __future__ import annotations

import pytest
import torch

#: a refusal comes before any model is built: well under this
DEADLINE = 30
#: and costs little memory beyond the imported command
PEAK_BYTES = 200 << 20

#: a command of each kind, with the files it reads (``q.pt``, ``m.onnx`` from ``qfv_files``)
COMMANDS = {
    "report": "report q.pt",
    "faults-sample": "faults sample q.pt --rate 0.1 --out m.pt",
    "faults-eval": "faults eval q.pt --rates 0 --trials 1 --out res --no-progress",
    "export": "export q.pt --out m2.onnx --exporter torchscript --samples 4",
    "verify": "verify m.onnx q.pt --samples 4",
    "train": "train --model mlp --float-epochs 1 --qat-epochs 1 --variants nmult --out run "
             "--no-progress",
    "quantize": "quantize q.pt --bits 3 --no-eval --no-plot --out p.pt",
    "selftune": "selftune q.pt --rate 0.1 --calib-size 8",
}

CASES = []


def case(name, cmd, extra, code, *mentions, env=None):
    CASES.append(pytest.param(COMMANDS[cmd] + " " + extra if cmd in COMMANDS else cmd,
                              code, mentions, env, id=name))


# --device: a typo, no device of that kind here, an index beyond the machine's devices.
NO_CUDA = not torch.cuda.is_available()
DEVICES = {"typo": "cpuu", "meta": "meta", "second-cpu": "cpu:1", "mps-index": "mps:3",
           "cuda-index-99": "cuda:99", "negative-index": "cuda:-1", "list": "cpu,cuda"}
for label, dev in DEVICES.items():
    for cmd in ("report", "faults-eval", "export", "train"):
        case(f"device-{label}-{cmd}", cmd, f"--device {dev}", 2, "--device")
for cmd in ("faults-sample", "selftune"):
    case(f"device-cuda-{cmd}", cmd, "--device cuda", 2, "--device cuda",
         "not available" if NO_CUDA else "")

# --threads: none, negative, more than any machine runs, not a number.
for label, n in {"zero": "0", "negative": "-2", "million": "1000000", "googol": "1" + "0" * 100,
                 "float": "2.5", "word": "many"}.items():
    for cmd in ("report", "faults-sample"):
        case(f"threads-{label}-{cmd}", cmd, f"--threads {n}", 2, "--threads")

# --workers on the Monte Carlo commands.
for label, n in {"zero": "0", "negative": "-1", "hundred-thousand": "100000",
                 "beyond-int": str(2 ** 40)}.items():
    case(f"workers-{label}", "faults-eval", f"--workers {n}", 2, "--workers")
    case(f"workers-{label}-bitflips", "bitflips eval q.pt --rates 0 --trials 1 --out bf "
         f"--no-progress --workers {n}", None, 2, "--workers")

# QFV_KERNELS that is no setting: refused, never the kernels it may have meant to rule out.
for label, value in {"word": "banana", "two": "2", "sentence": "torch please",
                     "escape": "\x1b[2Jtorch"}.items():
    for cmd in ("report", "faults-eval"):
        case(f"qfv-kernels-{label}-{cmd}", cmd, "", 2, "QFV_KERNELS=",
             env={"QFV_KERNELS": value})

# --seed: what numpy, scikit-learn and torch all take (0..2**32-1).
for label, s in {"negative": "-1", "2-to-32": str(2 ** 32), "huge": "9" * 30,
                 "float": "1e3"}.items():
    for cmd in ("faults-sample", "train", "quantize"):
        case(f"seed-{label}-{cmd}", cmd, f"--seed {s}", 2, "--seed")

# Counts beyond what a C int holds (they overflowed inside torch or itertools).
BIG = str(2 ** 63)
for name, cmd, opt in (("trials", "faults-eval", "--trials"),
                       ("samples", "export", "--samples"), ("batch", "export", "--batch-size"),
                       ("calib-size", "selftune", "--calib-size"),
                       ("batch-size", "train", "--batch-size"),
                       ("q-epochs", "train", "--qat-epochs"),
                       ("calib-samples", "quantize", "--calib-samples")):
    case(f"huge-{name}", cmd, f"{opt} {BIG}", 2, opt, "out of range")

# NaN and infinite numbers, each named.
for name, cmd, opt, value in (("rate-nan", "faults-sample", "--rate", "nan"),
                              ("rate-inf", "faults-sample", "--rate", "inf"),
                              ("max-acc-drop-nan", "export", "--max-acc-drop", "nan"),
                              ("max-acc-drop-inf", "export", "--max-acc-drop", "inf"),
                              ("tolerance-nan", "verify", "--tolerance", "nan"),
                              ("chip-sigma-nan", "selftune", "--chip-sigma", "nan"),
                              ("lambda-end-inf", "train", "--lambda-end", "inf"),
                              ("lr-inf", "train", "--float-lr", "inf")):
    extra = f"{opt} {value}" + (" --form fixed" if opt == "--max-acc-drop" else "")
    if cmd == "selftune":
        extra += " --sigma 0.1"
    mention = {"--rate": "rate", "--chip-sigma": "chip_sigma", "--lambda-end": "lambda_end",
               "--float-lr": "lr"}.get(opt, opt)
    case(f"{name}", cmd, extra, 2, mention, value)

# Empty paths: "" is the current folder to the system, never what was meant.
for name, argv, opt in (("checkpoint", "report ''", "CHECKPOINT"),
                        ("file", "inspect ''", "FILE"),
                        ("verify-checkpoint", "verify m.onnx ''", "CHECKPOINT"),
                        ("data-dir", "faults eval q.pt --data-dir '' --out res", "--data-dir"),
                        ("map", "faults finetune q.pt --fault-map '' --out ft.pt", "--fault-map"),
                        ("fault-map", "selftune q.pt --fault-map ''", "--fault-map"),
                        ("out-file", "faults sample q.pt --rate 0.1 --out ''", "--out"),
                        ("out-folder", "crossbar q.pt --out ''", "--out"),
                        ("out-results", "faults eval q.pt --out ''", "--out"),
                        ("out-run", "train --out ''", "--out"),
                        ("out-quantize", "quantize q.pt --bits 3 --out ''", "--out")):
    case(f"empty-{name}", argv, None, 2, f"{opt}: the path is empty")


def _split(text: str):
    return ["" if a == "''" else a for a in text.split()]


@pytest.mark.parametrize("argv,code,mentions,env", CASES)
def test_a_bad_option_is_refused_before_any_work(run_qfv, refused, snapshot, qfv_files,
                                                 tmp_path, argv, code, mentions, env):
    qfv_files(tmp_path, "q.pt", "m.onnx")
    before = snapshot(tmp_path)
    run = run_qfv(_split(argv), tmp_path, timeout=DEADLINE, env=env)
    refused(run, code, *[m for m in mentions if m])
    assert snapshot(tmp_path) == before
    assert run.peak_bytes < PEAK_BYTES, f"{run.peak_bytes >> 20} MB to refuse an option"


def test_the_suite_has_its_share_of_cases():
    assert len(CASES) >= 50
