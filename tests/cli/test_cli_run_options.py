"""The run options every ``qfv`` command shares (``--threads``, ``--device``, ``--debug``) and the
Monte Carlo scale-out options (``--workers``, ``--distributed``), run through ``qfv`` itself:
each must leave the results exactly those of a plain single-process run, and must reach the
process (threads set, ranks joined, only rank 0 writing)."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from qfv_brevitas.cli.app import main

QUIET = ["--no-progress"]
RATES = ["0", "0.2", "0.4"]
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    assert main(["train", "--model", "mlp", "--bits", "3", "--variants", "nmult", "--float-epochs",
                 "2", "--qat-epochs", "1", "--lambda-rise-epochs", "1", "--out", str(out),
                 *QUIET]) == 0
    return out / "nmult_w3a3.pt"


def _rows(folder):
    return json.loads((folder / "faults_eval.json").read_text())["rows"]


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert main(["faults", "eval", str(ckpt), "--rates", *RATES, "--trials", "3", "--layers",
                 "all", "--out", str(out), *QUIET]) == 0
    rows = _rows(out)
    assert len({r["acc"] for r in rows}) > 2  # the maps differ: equal rows below mean something
    return rows


def test_workers_threads_and_device_give_the_single_process_rows(ckpt, single, tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["faults", "eval", str(ckpt), "--rates", *RATES, "--trials", "3",
                     "--layers", "all", "--workers", "2", "--threads", "1", "--device", "cpu",
                     "--out", str(tmp_path / "w2"), *QUIET]) == 0
        assert torch.get_num_threads() == 1  # --threads reached the process
        assert _rows(tmp_path / "w2") == single
    finally:
        torch.set_num_threads(before)


def test_debug_leaves_a_successful_run_unchanged(ckpt, capsys):
    assert main(["report", str(ckpt), "--threads", "auto"]) == 0
    plain = capsys.readouterr()
    assert main(["--debug", "report", str(ckpt)]) == 0
    debug = capsys.readouterr()
    assert "net.5" in plain.out and debug.out == plain.out
    assert "Traceback" not in debug.err


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = main(["faults", "eval", ckpt, "--rates", *RATES, "--trials", "3", "--layers", "all",
                 "--distributed", "--out", out, *QUIET])
    if dist.is_initialized():
        dist.destroy_process_group()
    if code != 0:
        raise SystemExit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_ranks_give_the_single_process_rows_and_rank0_writes(ckpt, single, tmp_path,
                                                                         run_ranks):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path / "dist"
    run_ranks(_rank, (2, _free_port(), str(ckpt), str(out)), 2, TIMEOUT_S)
    assert _rows(out) == single
    assert not list(tmp_path.glob("dist*.tmp*"))  # one writer: no leftover partial outputs
