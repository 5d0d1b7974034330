"""Collection rules for the whole repository (tests/ and the doctests in qfv_brevitas/)."""
import importlib.util

collect_ignore = []
if importlib.util.find_spec("spikingjelly") is None:
    # These modules' doctests build LIF layers, which need the snn extra (spikingjelly);
    # the tests of tests/test_snn*.py skip themselves.
    collect_ignore += ["qfv_brevitas/snn/neurons.py", "qfv_brevitas/snn/network.py",
                       "qfv_brevitas/snn/models.py"]
if importlib.util.find_spec("lightning") is None:
    # The PyTorch Lightning callback needs the lightning extra; its tests skip themselves.
    collect_ignore += ["qfv_brevitas/training/lightning.py"]
