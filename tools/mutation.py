#!/usr/bin/env python3
"""Mutation check of the core modules: does the test suite notice plausible bugs?

Each mutant below is one small, plausible breakage: an exact snippet of a source file and
its replacement, with the few tests that should notice it. For every mutant the repository is
copied to a temporary folder (your working files are never touched), the snippet is replaced
there, and the mutant's tests run in that copy (``PYTHONPATH`` points at it). A mutant is
*caught* when a test fails, *not caught* when all pass. The table lists every mutant; the
exit status is 0 only if every mutant was caught and every snippet was found.

Run on demand, not in CI (about 2-4 minutes on 2 cores), under the shared CPU lock if there is
one:

    flock /tmp/qfv-cpu.lock .venv/bin/python tools/mutation.py            # all, 2 at a time
    .venv/bin/python tools/mutation.py --only train-adam-sgd-swapped -v   # one, with output
    .venv/bin/python tools/mutation.py --list                            # what is checked

A snippet that is no longer in its file (the code moved or changed) is reported as MISSING and
fails the run: update the mutant (file, snippet, tests) to the new code rather than drop it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: Tuple[str, ...]  # pytest arguments: files, node ids, "-k", expressions
    what: str  # the bug, in words


M = Mutant
MUTANTS: List[Mutant] = [
    # -- core/levels.py, search.py, distance.py: level tables, nearest-level search, distances ----
    M("levels-bit-order-reversed", "qfv_brevitas/core/levels.py",
      "        out = out + r[:, k:k + 1] * b[:, k]\n",
      "        out = out + r[:, k:k + 1] * b[:, r.shape[1] - 1 - k]\n",
      ("tests/core/test_levels.py::test_level_table_matches_definition",),
      "level table reads the code MSB first"),
    M("levels-ties-go-down", "qfv_brevitas/core/search.py",
      "        idx += wb >= thr_at[k]\n",
      "        idx += wb > thr_at[k]\n",
      ("tests/core/test_levels.py::test_threshold_ties_go_up_hand_made",),
      "a weight exactly on a decision threshold goes to the lower level"),
    M("levels-1ulp-threshold", "qfv_brevitas/core/levels.py",
      "    thr = torch.where(thr > lo, thr, hi)\n",
      "    thr = torch.where(thr > lo, thr, lo)\n",
      ("tests/core/test_levels.py::test_level_one_ulp_from_neighbour_snaps_to_itself",),
      "levels one ulp apart: a weight on the lower level is sent up"),
    M("levels-nearest-materialises", "qfv_brevitas/core/search.py",
      "        idx = nearest_op(w2d, thr, values, False)[1]\n"
      "        if values.shape[0] == 1:",
      "        idx = (w2d[:, :, None] - values[:, None, :]).abs().argmin(-1).to(torch.uint8)\n"
      "        if values.shape[0] == 1:",
      ("tests/core/test_levels.py::test_nearest_and_regularizer_peak_memory_is_o_n_at_8_bits",),
      "nearest() builds the full (G, M, 2**N) distance array (issue 11, #7)"),
    M("levels-eq7-level-grad-sign", "qfv_brevitas/core/search.py",
      "(sums.view(G, L) * (-2 * g))",
      "(sums.view(G, L) * (2 * g))",
      ("tests/core/test_levels.py::test_sq_distance_gradients_are_eq7",),
      "eq. 7: the gradient to r and c has the wrong sign"),
    M("levels-weight-grad-factor", "qfv_brevitas/core/search.py",
      "values_block(values, ib, r0, r1)\n        if need_w:\n            torch.mul(d, 2 * g, out=",
      "values_block(values, ib, r0, r1)\n        if need_w:\n            torch.mul(d, g, out=",
      ("tests/core/test_levels.py::test_sq_distance_gradcheck",),
      "d/dw of (w - q)^2 missing its factor 2"),
    M("levels-ste-no-weight-grad", "qfv_brevitas/core/search.py",
      "        return (g if ctx.needs_input_grad[0] else None), grad_levels\n",
      "        return None, grad_levels\n",
      ("tests/core/test_levels.py::test_snap_ste_forward_and_gradients",),
      "straight-through estimator passes no gradient to the weights"),
    M("levels-lsq-step", "qfv_brevitas/core/levels.py",
      "mean(dim=1) / (qp(bits) ** 0.5)",
      "mean(dim=1) / qp(bits)",
      ("tests/core/test_levels.py::test_qp_and_lsq_step_init",),
      "LSQ step init divides by Q_P instead of sqrt(Q_P)"),
    # -- torch custom ops, torch.compile / torch.export (issue 21) ----------------------------------
    M("compile-fake-search-index-dtype", "qfv_brevitas/core/search.py",
      "    return w2d.new_empty(()), w2d.new_empty(w2d.shape, dtype=torch.uint8)\n",
      "    return w2d.new_empty(()), w2d.new_empty(w2d.shape, dtype=torch.int64)\n",
      ("tests/test_compile.py", "-k", "opcheck"),
      "the search op's fake implementation disagrees with the real one (dtype)"),
    M("compile-fused-grad-unscaled", "qfv_brevitas/core/device.py",
      "    grad_w = scale_op(resid, 2 * g) if need_w else None\n",
      "    grad_w = scale_op(resid, g) if need_w else None\n",
      ("tests/core/test_device.py", "-k", "aware_sq_distance_is_the_distance"),
      "the device-aware distance's registered autograd misses the factor 2 of d(w - v)^2/dw"),
    M("compile-finite-check-while-compiling", "qfv_brevitas/core/quantizers.py",
      "        if not (training and sync_free(w2d)) and not torch.compiler.is_compiling():\n",
      "        if not (training and sync_free(w2d)):\n",
      ("tests/test_compile.py", "-k", "no_graph_break"),
      "the weights' finiteness check (a host sync) runs inside compiled forwards"),
    M("compile-regularizer-sync", "qfv_brevitas/training/regularizer.py",
      "    if not sync_free(total) and not torch.compiler.is_compiling() \\\n",
      "    if not sync_free(total) \\\n",
      ("tests/test_compile.py", "-k", "training_step_with_the_regularizer"),
      "the regularizer's check of its sum (a host sync) runs inside a compiled training step"),
    # -- core/quantizers.py: the Brevitas seam -----------------------------------------------------
    M("quantizers-to-groups-ignores-channel-dim", "qfv_brevitas/core/groups.py",
      "        return t.movedim(self.axis, 0).reshape((t.shape[self.axis], -1) + rest)\n",
      "        return t.reshape((t.shape[self.axis], -1) + rest)\n",
      ("tests/core/test_quantizers.py::test_per_channel_on_the_output_axis_of_a_transposed_conv",),
      "per-channel groups taken along axis 0 whatever the channel axis (issue 11, #5)"),
    M("quantizers-paper-mode-never-snaps", "qfv_brevitas/core/quantizers.py",
      '        elif self.mode == "paper" and self.training:\n',
      '        elif self.mode == "paper":\n',
      ("tests/core/test_quantizers.py", "-k", "paper_mode_trains_on_float_weights"),
      "paper mode keeps full-precision weights in eval too"),
    M("quantizers-both-without-regularizer", "qfv_brevitas/core/quantizers.py",
      '        return self.mode in ("paper", "both")\n',
      '        return self.mode == "paper"\n',
      ("tests/training/test_regularizer.py",),
      "mode 'both' (STE + regularizer) loses its regularizer"),
    M("quantizers-aware-mapping-ignored", "qfv_brevitas/core/chip.py",
      '        if self.mapping == "aware":\n            return D.aware_codes(',
      '        if self.mapping == "never":\n            return D.aware_codes(',
      ("tests/chip/test_repair.py", "-k", "aware_deployment_is_nearest_reachable"),
      "deploy_mapping='aware' deploys naive codes"),
    M("quantizers-mode-not-restored", "qfv_brevitas/core/quantizers.py",
      '        self.mode = check_choice(state.get("mode", self.mode), FORWARD_MODES, "forward mode")\n',
      '        check_choice(state.get("mode", self.mode), FORWARD_MODES, "forward mode")\n',
      ("tests/core/test_quantizers.py", "-k", "mode_restored_from_checkpoint"),
      "a checkpoint's forward mode is not restored on load"),
    # -- training/regularizer.py, core/config.py: eq. 6 and the lambda schedule ------------------
    M("regularizer-alpha", "qfv_brevitas/training/regularizer.py",
      "    return 1.0 / math.sqrt(num_weights * qp(bits))\n",
      "    return 1.0 / math.sqrt(num_weights) / qp(bits)\n",
      ("tests/training/test_regularizer.py",),
      "alpha_l = 1/(sqrt(n) Q_P) instead of 1/sqrt(n Q_P)"),
    M("config-lambda-rise-late", "qfv_brevitas/core/config.py",
      "        frac = (epoch - first_rise + 1) / self.rise_epochs\n",
      "        frac = (epoch - first_rise) / self.rise_epochs\n",
      ("tests/training/test_regularizer.py", "-k", "schedule"),
      "the lambda rise starts one epoch late"),
    # -- training/train.py: the QAT loop --------------------------------------------------------
    M("train-quant-optimizer-never-built", "qfv_brevitas/training/train.py",
      "    if quant:\n        if cfg.quant_optimizer",
      "    if False:\n        if cfg.quant_optimizer",
      ("tests/training/test_train.py",),
      "fit never builds the optimizer of r/c (issue 11, #1)"),
    M("train-quant-optimizer-never-stepped", "qfv_brevitas/training/train.py",
      "    for o, sch in zip(run.opts, run.scheds):\n",
      "    for o, sch in zip(run.opts[:1], run.scheds[:1]):\n",
      ("tests/training/test_train.py",),
      "fit never steps the optimizer of r/c (issue 11, #1)"),
    M("train-adam-sgd-swapped", "qfv_brevitas/training/train.py",
      '        if cfg.quant_optimizer == "adam":\n',
      '        if cfg.quant_optimizer == "sgd":\n',
      ("tests/training/test_train.py",),
      "Adam and SGD for r/c swapped (issue 11, #2)"),
    M("train-weight-decay-on-r-c", "qfv_brevitas/training/train.py",
      '{"params": quant, "weight_decay": 0.0,',
      '{"params": quant, "weight_decay": cfg.weight_decay,',
      ("tests/training/test_train.py",),
      "weight decay applied to r/c (issue 11, #2)"),
    M("train-lambda-held", "qfv_brevitas/training/train.py",
      "    lam = run.reg.lam(epoch) if run.reg is not None else 0.0\n",
      "    lam = run.reg.lam(0) if run.reg is not None else 0.0\n",
      ("tests/training/test_train.py",),
      "fit keeps lambda at its first value (issue 11, #3)"),
    M("train-cosine-per-epoch", "qfv_brevitas/training/train.py",
      "T_max=cfg.epochs * len(loader))",
      "T_max=cfg.epochs)",
      ("tests/training/test_train.py",),
      "cosine decay over epochs while it is stepped every batch"),
    # -- training/train.py, lightning.py: a user's loss and metrics, the Lightning callback -------
    M("train-loss-fn-ignored", "qfv_brevitas/training/train.py",
      "    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn\n",
      "    loss_fn = nn.CrossEntropyLoss()\n",
      ("tests/training/test_train.py", "-k", "custom_loss"),
      "fit trains with cross-entropy whatever loss_fn it is given (issue 23)"),
    M("train-metrics-mean-of-batches", "qfv_brevitas/training/train.py",
      "(v.detach() if isinstance(v, Tensor) else float(v)) * len(y)",
      "(v.detach() if isinstance(v, Tensor) else float(v))",
      ("tests/training/test_train.py", "-k", "metrics"),
      "a metric is averaged over batches, not samples (a short last batch counts in full)"),
    M("lightning-lambda-held", "qfv_brevitas/training/lightning.py",
      "        lam = self.reg.lam(epoch)\n",
      "        lam = self.reg.lam(0)\n",
      ("tests/training/test_lightning.py", "-k", "schedule"),
      "the Lightning callback keeps lambda at its first value (issue 23)"),
    M("lightning-refit-per-batch", "qfv_brevitas/training/lightning.py",
      "if self._refit and step != self._last_refit_step and step % self.refit_every == 0:",
      "if self._refit and step % self.refit_every == 0:",
      ("tests/training/test_lightning.py", "-k", "refitted"),
      "with gradient accumulation the levels are refitted once per batch, not per step"),
    # -- chip/repair.py: fault-aware fine-tuning ---------------------------------------------------
    M("repair-remap-only-at-the-end", "qfv_brevitas/chip/repair.py",
      "        if (epoch + 1) % remap_every == 0 or epoch == cfg.epochs - 1:\n",
      "        if epoch == cfg.epochs - 1:\n",
      ("tests/chip/test_repair.py", "-k", "remaps_every"),
      "fault-aware fine-tuning ignores remap_every (issue 11, #4)"),
    M("repair-finetune-keeps-ste", "qfv_brevitas/chip/repair.py",
      '    set_forward_mode(model, "paper")\n    set_deploy_mapping(model, "aware")\n'
      "    remap_to_valid_(model)\n",
      '    set_deploy_mapping(model, "aware")\n    remap_to_valid_(model)\n',
      ("tests/chip/test_repair.py", "-k", "remaps_every"),
      "fault-aware fine-tuning no longer switches to paper mode (issue 11, #4)"),
    M("repair-remap-moves-every-weight", "qfv_brevitas/chip/repair.py",
      "        new = torch.where(faulty, v.to(w2d.dtype), w2d)\n",
      "        new = v.to(w2d.dtype)\n",
      ("tests/chip/test_repair.py", "-k", "remap_moves_only_faulty"),
      "remapping moves fault-free weights too"),
    # -- core/device.py, chip/faults.py, variability.py, bitflips.py, studies/scenario.py ----------
    M("device-stuck-at-1-ignored", "qfv_brevitas/core/device.py",
      "    if sa1 is not None:\n        out = out | sa1\n",
      "    if sa1 is not None:\n        out = out\n",
      ("tests/core/test_device.py",),
      "stuck-at-1 cells read as programmed"),
    M("faults-sa1-share", "qfv_brevitas/chip/faults.py",
      "    t1 = rate * sa1_fraction",
      "    t1 = rate * (1 - sa1_fraction)",
      ("tests/chip/test_faults.py", "-k", "binomial"),
      "stuck-at-1 and stuck-at-0 shares swapped"),
    M("variability-lognormal-mean", "qfv_brevitas/chip/variability.py",
      "    return torch.exp(math.sqrt(s2) * z - s2 / 2)\n",
      "    return torch.exp(math.sqrt(s2) * z)\n",
      ("tests/chip/test_variability.py", "-k", "lognormal"),
      "lognormal factors with median 1 instead of mean 1"),
    M("variability-normal-unclipped", "qfv_brevitas/chip/variability.py",
      "        return (1.0 + sigma * z).clamp_(min=0.0)\n",
      "        return 1.0 + sigma * z\n",
      ("tests/chip/test_variability.py", "-k", "clipped"),
      "normal factors go negative (a negative conductance)"),
    M("evaluate-same-map-every-trial", "qfv_brevitas/studies/scenario.py",
      "        dm = self.device_model(seed + trial, seed + trial // self.devices_per_chip, exempt)\n",
      "        dm = self.device_model(seed, seed + trial // self.devices_per_chip, exempt)\n",
      ("tests/studies/test_montecarlo.py",),
      "Monte Carlo draws the same map in every trial"),
    M("bitflip-rate-per-word", "qfv_brevitas/chip/bitflips.py",
      "        out |= (torch.rand(numel, generator=gen) < rate).to(torch.uint8) << i\n",
      "        out |= (torch.rand(numel, generator=gen) < rate / bits).to(torch.uint8) << i\n",
      ("tests/chip/test_bitflips.py",),
      "bit-error rate applied per word instead of per bit"),
    # -- core/convert.py, export/fixedpoint.py, core/chip.py ---------------------------------------
    M("convert-edges-not-8-bit", "qfv_brevitas/core/convert.py",
      "        abits = config.first_last_bits if name in edge else config.act_bits\n",
      "        abits = config.act_bits\n",
      ("tests/core/test_convert.py", "-k", "resnet_converted_layers or vgg_converted_layers"),
      "first/last layers' input activations not at first_last_bits"),
    M("export-round-to-grid-floors", "qfv_brevitas/export/fixedpoint.py",
      "    return (t.double() * s).round().div(s).to(t.dtype)\n",
      "    return (t.double() * s).floor().div(s).to(t.dtype)\n",
      ("tests/export/test_export.py", "-k", "round_to_grid"),
      "round_to_grid floors (issue 11, #6)"),
    M("export-fixed-point-width", "qfv_brevitas/export/fixedpoint.py",
      "        return max(1, int(hi).bit_length()), False\n",
      "        return max(1, int(hi).bit_length()) + 1, False\n",
      ("tests/export/test_export.py", "-k", "smallest_that_holds"),
      "fixed-point export declares one integer bit more than the levels need"),
    M("export-programmed-not-held-codes", "qfv_brevitas/core/chip.py",
      "        return codes if self.sa0 is None else D.force_codes(codes, *self.maps()[:2])\n",
      "        return codes  # (the device's stuck bits left out)\n",
      ("tests/export/test_export.py", "-k", "faulty_device_export_holds_the_forced_codes"),
      "the exported file holds the programmed codes, not those the faulty device holds"),
    # -- files a user gives: structure, graph vs metadata, deadline (issue 22) -------------------
    M("untrusted-walk-skips-subgraphs", "qfv_brevitas/export/structure.py",
      "                stack.extend((s, f\"{at} (attribute {shown(a.name, 40)})\") for s in subs)\n",
      "                pass\n",
      ("tests/export/test_structure.py", "-k", "loop_hidden or two_subgraphs"),
      "the structural check walks the main graph only: a Loop inside an If goes unseen"),
    M("untrusted-external-data-kept", "qfv_brevitas/export/structure.py",
      "    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):\n",
      "    if False:\n",
      ("tests/export/test_structure.py", "-k", "lying_or_foreign_initializer"),
      "a tensor whose data lives in another file is not refused"),
    M("untrusted-coverage-own-op-only", "qfv_brevitas/export/checks.py",
      "            quants = [q for q in upstream(w, producers) if q.op_type in QUANTIZER_OPS]\n",
      "            quants = [q for q in upstream(w, producers) if q.op_type == OP_TYPE]\n",
      ("tests/export/test_structure.py", "-k", "metadata_omits"),
      "a layer quantized by a standard Quant node that the metadata omits goes unnamed"),
    M("untrusted-deadline-no-terminate", "qfv_brevitas/export/deadline.py",
      "                opts.terminate = True\n",
      "                pass\n",
      ("tests/export/test_structure.py", "-k", "stops_onnxruntime_between_nodes"),
      "a stopped graph run is left to finish its onnxruntime call (seconds, or forever)"),
    # -- export forms (issue 20) ----------------------------------------------------------------
    M("fixed-one-bit-signed", "qfv_brevitas/export/fixedpoint.py",
      "    b = 2\n", "    b = 1\n",
      ("tests/export/test_forms.py", "-k", "few_fractional"),
      "a -1..0 range exported as a 1-bit signed Quant, which QONNX runs as bipolar +-1"),
    M("locate-by-shared-constant", "qfv_brevitas/export/graph.py",
      "        if len(own) == 1:\n", "        if False:\n",
      ("tests/export/test_forms.py", "-k", "few_fractional"),
      "a layer found by the name of a constant TorchScript shares with another layer"),
    M("forms-unknown-name-is-compact", "qfv_brevitas/export/forms/base.py",
      "    form = _FORMS.get(name) if isinstance(name, str) else None\n",
      "    form = _FORMS.get(name, _FORMS[\"compact\"]) if isinstance(name, str) else None\n",
      ("tests/export/test_forms.py", "-k", "unknown"),
      "an unknown form name silently exports the compact form"),
    M("forms-planes-multipliers-unchecked", "qfv_brevitas/export/forms/planes.py",
      "        if v is None or not same(v, m[:, k]):\n",
      "        if v is None:\n",
      ("tests/export/test_export.py", "-k", "planes_form_checks_catch_a_changed_file"),
      "the planes form's check does not compare the graph's multipliers with the metadata"),
    M("forms-fixed-scale-unchecked", "qfv_brevitas/export/forms/fixed.py",
      "        if not same(scale, 2.0 ** -f) or not same(zero, 0.0):\n",
      "        if not same(zero, 0.0):\n",
      ("tests/export/test_forms.py", "-k", "checks_its_own_structure"),
      "the fixed form's check does not look at the Quant node's scale"),
    M("forms-bitplanes-shared-quant", "qfv_brevitas/export/forms/bitplanes.py",
      "        return [UnshareWeightQuants()] + super().transformations(layers)\n",
      "        return super().transformations(layers)\n",
      ("tests/export/test_forms.py", "-k", "own_quant_node"),
      "equal bit planes share one Quant node (a fork FINN refuses)"),
    M("arrays-level-table-msb-first", "qfv_brevitas/export/arrays.py",
      "        table = table + r[:, i:i + 1] * b[:, i]\n",
      "        table = table + r[:, i:i + 1] * b[:, r.shape[1] - 1 - i]\n",
      ("tests/export/test_ops.py",),
      "the numpy level table (the op's reference) reads codes MSB first"),
    # -- the integer view (issue 21) ----------------------------------------------------------
    M("intview-width-unsigned", "qfv_brevitas/core/intview.py",
      "    return (torch.log2(span).ceil() + 1).float()\n",
      "    return torch.log2(span).ceil().float()\n",
      ("tests/core/test_intview.py", "-k", "width"),
      "the integer levels' width drops the sign bit"),
    M("intview-offset-unrounded", "qfv_brevitas/core/quantizers.py",
      "        return self.c if self.frac_bits is None else IV.round_ste(self.c, self.frac_bits)\n",
      "        return self.c\n",
      ("tests/core/test_intview.py", "-k", "int_quant_tensor_of_the_levels"),
      "the offset is left off the grid: levels are not integers times 2^-f"),
    M("intview-ste-blocks-gradient", "qfv_brevitas/core/intview.py",
      "    return t + (torch.round(t.detach() * s) / s - t.detach())\n",
      "    return torch.round(t * s) / s\n",
      ("tests/core/test_intview.py", "-k", "gradient or learn"),
      "the rounding of r and c has no straight-through gradient: they stop learning"),
    M("intview-export-ignores-training-grid", "qfv_brevitas/export/fixedpoint.py",
      "    if own:\n        frac_bits = info.frac_bits\n",
      "    if False:\n        frac_bits = info.frac_bits\n",
      ("tests/export/test_intview_export.py", "-k", "mixed"),
      "the fixed form rounds a layer trained on its grid to the export's f instead"),
    M("intview-not-switched-on-for-int-bias", "qfv_brevitas/core/quantizers.py",
      "                    bq.is_quant_enabled and getattr(bq, \"requires_input_scale\", False):\n",
      "                    bq.is_quant_enabled and False:\n",
      ("tests/core/test_intview.py", "-k", "int32_bias"),
      "an Int32Bias layer is not given the integer view (it then fails)"),
    M("lower-trunc-shift-multiplies", "qfv_brevitas/export/graph.py",
      "            helper.make_node(\"Div\", [p + \"_round\", p + \"_ratio\"], [p + \"_shift\"]),\n",
      "            helper.make_node(\"Mul\", [p + \"_round\", p + \"_ratio\"], [p + \"_shift\"]),\n",
      ("tests/export/test_ops.py", "-k", "trunc"),
      "the lowered Trunc multiplies by the scales' ratio instead of dividing"),
    # -- the related methods: shapes, SAM, self-tuning ---------------------------------------------
    M("shapes-gauss-width-unscaled", "qfv_brevitas/core/distance.py",
      "        s = k * h\n",
      "        s = k\n",
      ("tests/core/test_distance.py", "-k", "gauss_width_sets_sigma"),
      "Gaussian well's sigma not scaled by the local level spacing"),
    M("shapes-sin-period", "qfv_brevitas/core/distance.py",
      "        t = math.pi * d / h\n",
      "        t = 2 * math.pi * d / h\n",
      ("tests/core/test_distance.py", "-k", "sinreq"),
      "SinReQ's sinusoid with half the level spacing as period (zero between levels)"),
    M("sam-unnormalised-ascent", "qfv_brevitas/training/sam.py",
      "        scale = self.rho / norm if norm > 0 else 0.0\n",
      "        scale = self.rho if norm > 0 else 0.0\n",
      ("tests/training/test_sam.py", "-k", "hand_computed_two_step_update_plain_model"),
      "SAM ascends by rho * g instead of rho * g / ||g||"),
    M("selftune-scale-inverted", "qfv_brevitas/chip/selftune.py",
      "ref_std / std.clamp(min=self.eps)",
      "std / ref_std.clamp(min=self.eps)",
      ("tests/chip/test_selftune.py", "-k", "restores_the_clean_layer_statistics"),
      "self-tuning scales by chip std / reference std (the inverse)"),
    # -- more state and conversion ----------------------------------------------------------------
    M("proxy-deploy-mapping-not-restored", "qfv_brevitas/core/chip.py",
      "        self.mapping = mapping\n",
      "        pass\n",
      ("tests/chip/test_repair.py", "-k", "round_trip_through_a_checkpoint"),
      "a checkpoint's aware deploy mapping comes back naive"),
    M("convert-always-signed-activations", "qfv_brevitas/core/convert.py",
      "Uint8ActPerTensorFloat if nonneg.get(name, False) else Int8ActPerTensorFloat",
      "Int8ActPerTensorFloat",
      ("tests/core/test_convert.py", "-k", "edges_and_signs"),
      "non-negative inputs (after ReLU) get signed activation quantizers: a bit wasted"),
    M("levels-blocks-drop-last-column", "qfv_brevitas/core/search.py",
      "            yield r, r + 1, c0, min(c0 + block, M)\n",
      "            yield r, r + 1, c0, min(c0 + block, M - 1)\n",
      ("tests/core/test_levels.py", "-k", "blocks_tile"),
      "the blocked passes skip the last weight of long rows"),
    M("evaluate-edges-on-the-device", "qfv_brevitas/studies/scenario.py",
      '    return {n: 0.0 for n in edge_layers(model)} if layers == "inner" else {}\n',
      "    return {}\n",
      ("tests/studies/test_montecarlo.py", "-k", "edge_layers_and_all_layers"),
      "layers='inner' puts the 8-bit first and last layers on the faulty device too"),
    # -- untrusted files, scale-out (issues 14, 15) -------------------------------------------------
    M("checkpoint-digest-unchecked", "qfv_brevitas/zoo/checkpoint.py",
      '        if digest != ckpt["sha256"]:\n',
      "        if False:\n",
      ("tests/test_safe_files.py", "-k", "checksum_notices"),
      "a checkpoint whose weights were edited loads without complaint"),
    M("checkpoint-loads-any-pickle", "qfv_brevitas/util/safeio.py",
      '            obj = torch.load(path, map_location="cpu", weights_only=True)\n',
      '            obj = torch.load(path, map_location="cpu", weights_only=False)\n',
      ("tests/test_safe_files.py", "-k", "crafted_pickles"),
      "loading a checkpoint or a map runs the code a crafted pickle carries"),
    M("safeio-file-overwritten-without-force", "qfv_brevitas/util/safeio.py",
      '        if kind == "file" and not overwrite:\n',
      '        if kind == "file" and overwrite is None:\n',
      ("tests/util/test_safeio.py",),
      "an existing output file is replaced without --force"),
    # -- budgets before work (issue 22) -----------------------------------------------------------
    M("budgets-torch-inflates-deflated-entries", "qfv_brevitas/util/budgets.py",
      "    elif stored_only:\n        raise ZipProblem(where, f\"zip entry {name} is compressed",
      "    elif False:\n        raise ZipProblem(where, f\"zip entry {name} is compressed",
      ("tests/util/test_budgets.py", "-k", "compressed"),
      "a checkpoint whose entries are deflated is handed to torch, which inflates them"),
    M("budgets-walk-budget-off-by-one", "qfv_brevitas/util/budgets.py",
      "                if nodes > budget.nodes:\n",
      "                if nodes >= budget.nodes:\n",
      ("tests/util/test_budgets.py", "-k", "walk_budget"),
      "the walk budget refuses a loaded object of exactly its budget"),
    M("checkpoint-model-built-before-its-size-is-checked", "qfv_brevitas/zoo/checkpoint.py",
      "    _check_fits(path, arch, tuple(shape), num_classes, meta, config, unsigned, state)\n",
      "    pass\n",
      ("tests/zoo/test_checkpoint.py", "-k", "larger_than_its_weights or more_values"),
      "a checkpoint's settings build the real model before its size is compared with the "
      "weights (a 54 KB file builds a 4 GB model)"),
    M("idx-gzip-header-not-held-to-its-bytes", "qfv_brevitas/zoo/data.py",
      "    if gzipped and header + expected > deflate_limit(size):\n",
      "    if False:\n",
      ("tests/zoo/test_data.py", "-k", "deflate_can_hold"),
      "a gzip IDX header may announce more than its compressed bytes can hold"),
    M("idx-gzip-inflated-to-the-end", "qfv_brevitas/zoo/data.py",
      "    if more:\n        raise DataError(f\"{path}: payload is more than",
      "    if fh.read() or more:\n        raise DataError(f\"{path}: payload is more than",
      ("tests/zoo/test_data.py", "-k", "only_as_far"),
      "trailing data is looked for by inflating the rest of the stream"),
    M("parallel-every-rank-runs-rank0s-share", "qfv_brevitas/util/parallel.py",
      "    return list(range(rank, n, world))\n",
      "    return list(range(0, n, world))\n",
      ("tests/util/test_parallel.py", "-k", "distributed"),
      "every torch.distributed rank runs rank 0's trials: the others are never drawn"),
    # -- fitting.py and its users: levels fitted to the weights (issue 10) ------------------------
    M("fitting-least-squares-never-moves", "qfv_brevitas/core/fitting.py",
      "    return torch.where(ok.unsqueeze(-1), x, x_prev)\n",
      "    return x_prev\n",
      ("tests/core/test_fitting.py", "-k", "nearby_start or additive_grid_are_recovered"),
      "the alternation's least-squares step never moves (r, c): the fit is its best start"),
    M("fitting-init-fit-is-lsq", "qfv_brevitas/core/quantizers.py",
      '        if self.level_init == "lsq":\n',
      '        if self.level_init in ("lsq", "fit"):\n',
      ("tests/studies/test_ptq.py", "-k", "level_init_on_a_brevitas_layer or fits_the_real_weights"),
      "init='fit' quietly starts from LSQ's grid"),
    M("train-refit-ignored", "qfv_brevitas/training/train.py",
      "        refit_levels_(run.model, warm=True)\n",
      "        pass\n",
      ("tests/training/test_refit.py", "-k", "refit_every_refits_during_training"),
      "TrainConfig.refit_every is ignored: the levels are never refitted during QAT"),
    M("fitting-no-uniform-fallback", "qfv_brevitas/core/fitting.py",
      "        worse = error > ef\n",
      "        worse = error > math.inf\n",
      ("tests/core/test_fitting.py", "-k", "falls_back or never_worse"),
      "the final check never falls back to the best uniform grid / warm start"),
    # -- fitting.py: the batched per-channel search (issue 24) ------------------------------------
    M("fitting-batched-screen-keeps-worst", "qfv_brevitas/core/fitting.py",
      "    idx = err.argsort(dim=1, stable=True)[:, :keep]\n",
      "    idx = err.argsort(dim=1, stable=True, descending=True)[:, :keep]\n",
      ("tests/core/test_fitting_batched.py", "-k", "close_to_the_exhaustive or beat_uniform"),
      "the batched search goes on from each group's worst screened starts"),
    M("fitting-batched-gain-backwards", "qfv_brevitas/core/fitting.py",
      "    return (best_err - err) > tol * err.clamp_min(1e-300)\n",
      "    return (err - best_err) > tol * err.clamp_min(1e-300)\n",
      ("tests/core/test_fitting_batched.py", "-k", "close_to_the_exhaustive or beat_uniform"),
      "a start's gain is read the wrong way round: every start of the batched search stops "
      "after its first step"),
    M("fitting-batched-dense-budget-per-call", "qfv_brevitas/core/fitting.py",
      "    n = _DENSE_BUDGET_GROUP // max(1, coarse.ws.shape[1] * nl) if batched else \\\n",
      "    n = _DENSE_BUDGET_GROUP // max(1, coarse.G * coarse.ws.shape[1] * nl) if batched else \\\n",
      ("tests/core/test_fitting_batched.py", "-k", "chunking or other_groups"),
      "the batched dense look at uniform grids shrinks with the chunk's size"),
    M("fitting-batched-chunk-init-first", "qfv_brevitas/core/fitting.py",
      "                                                    init[1][g0:g0 + chunk]),\n",
      "                                                    init[1][:chunk]),\n",
      ("tests/core/test_fitting_batched.py", "-k", "warm_refit"),
      "every chunk of a batched warm refit starts from the first chunk's offsets"),
    # -- studies/calibration.py, ptq.py: Brevitas' PTQ toolbox (issue 21) -----------------------
    M("toolbox-calibration-sees-no-data", "qfv_brevitas/studies/calibration.py",
      "    with calibration_mode(model):\n        _run(model, batches)\n",
      "    with calibration_mode(model):\n        pass\n",
      ("tests/studies/test_calibration.py", "-k", "calibration_sets_the_scales"),
      "activation quantizers are never calibrated: they keep their start scales"),
    M("toolbox-baseline-skips-the-steps", "qfv_brevitas/studies/ptq.py",
      "    result.baseline_model = _apply_steps(base, steps)\n",
      "    result.baseline_model = base.eval()\n",
      ("tests/studies/test_calibration.py", "-k", "act_bits_quantizes or toolbox_through"),
      "the Brevitas baseline gets no calibration, GPTQ or bias correction: an unfair comparison"),
    M("toolbox-bias-correction-ignored", "qfv_brevitas/studies/calibration.py",
      "    if bias_correction:\n        correct_biases(model, batches)\n",
      "    if False:\n        correct_biases(model, batches)\n",
      ("tests/studies/test_calibration.py", "-k", "toolbox_through"),
      "bias_correction=True / --bias-correction does nothing"),
    M("toolbox-act-bits-ignored", "qfv_brevitas/studies/ptq.py",
      'config = NMultConfig(weight_bits=bits, act_bits=steps["act_bits"], variant="nmult",',
      'config = NMultConfig(weight_bits=bits, act_bits=None, variant="nmult",',
      ("tests/studies/test_calibration.py", "-k", "act_bits_quantizes"),
      "act_bits leaves the N-multiplier model's activations in float"),
    # -- per-channel paths: quantizers, fitting, PTQ reports, the chip (issue 27) ------------------
    M("pc-selftune-pooled-std", "qfv_brevitas/chip/selftune.py",
      "    return y.mean(0), y.std(0, unbiased=False)\n",
      "    return y.mean(0), y.std(unbiased=False).expand(y.shape[1])\n",
      ("tests/test_per_channel_core.py", "-k", "self_tuning"),
      "self-tuning's per-channel std pooled over all channels: every channel rescaled alike"),
    M("pc-ptq-lsq-grid-per-tensor", "qfv_brevitas/studies/ptq.py",
      "        lsq = L.uniform_multipliers(L.lsq_step_init(w2d, tq.bits), tq.bits)\n",
      "        lsq = L.uniform_multipliers(L.lsq_step_init(w2d.reshape(1, -1), tq.bits)"
      ".expand(w2d.shape[0]), tq.bits)\n",
      ("tests/test_per_channel_core.py", "-k", "ptq_report_rows"),
      "the PTQ report's LSQ grid of a per-channel layer takes one step for the whole tensor"),
    M("pc-ptq-nonuniformity-first-channel", "qfv_brevitas/studies/ptq.py",
      "        nonuni = float(FIT.nonuniformity(r).max()) if tq.bits > 1 else 0.0\n",
      "        nonuni = float(FIT.nonuniformity(r[:1]).max()) if tq.bits > 1 else 0.0\n",
      ("tests/test_per_channel_core.py", "-k", "ptq_report_rows"),
      "the PTQ report's non-uniformity looks at the first channel's multipliers only"),
    M("pc-ptq-mse-averaged-over-channels", "qfv_brevitas/studies/ptq.py",
      "        mse = float(FIT.grid_error(w2d, lv).sum()) / n\n",
      "        mse = float(FIT.grid_error(w2d, lv).mean()) / n\n",
      ("tests/test_per_channel_core.py", "-k", "ptq_report_rows"),
      "the PTQ report's MSE averages the per-channel errors instead of summing them (G x too "
      "small per channel, right per tensor)"),
    M("pc-ptq-baseline-per-tensor", "qfv_brevitas/studies/ptq.py",
      '("max", True): Int8WeightPerChannelFloat,',
      '("max", True): Int8WeightPerTensorFloat,',
      ("tests/test_per_channel_core.py", "-k", "brevitas"),
      "the per-channel Brevitas max-scale baseline is per tensor: its channels at 1e-3 flush "
      "to zero"),
    M("pc-fitting-first-channels-mean", "qfv_brevitas/core/fitting.py",
      "    r, c = _positive_multipliers(x[:, :bits], x[:, bits] + sw.mean)\n",
      "    r, c = _positive_multipliers(x[:, :bits], x[:, bits] + sw.mean[:1])\n",
      ("tests/test_per_channel_core.py", "-k", "fit"),
      "the fitted offsets get the first channel's mean back instead of their own"),
    M("pc-fitting-constant-channel-first-value", "qfv_brevitas/core/fitting.py",
      "        off = torch.where(const, w2d[:, 0].detach(), off)\n",
      "        off = torch.where(const, w2d[:1, 0].detach(), off)\n",
      ("tests/test_per_channel_core.py", "-k", "own_uniform_grid"),
      "the uniform grid of an all-zero (constant) channel sits on channel 0's first weight"),
    M("pc-chip-variability-first-channel-r", "qfv_brevitas/core/device.py",
      "    return ideal + deviation(bits, r[:, None, :], lrs, hrs)\n",
      "    return ideal + deviation(bits, r[:1, None, :], lrs, hrs)\n",
      ("tests/test_per_channel_core.py", "-k", "variability"),
      "variability scales channel 0's multipliers in every channel's deployed values"),
    M("pc-chip-aware-faults-first-channel-levels", "qfv_brevitas/core/device.py",
      "            lv = levels if G == 1 else levels[idx // M]\n",
      "            lv = levels[:1]\n",
      ("tests/test_per_channel_core.py", "-k", "aware_mapping"),
      "the fault-aware search of a weight with stuck bits looks at channel 0's levels (torch "
      "path)"),
    M("pc-chip-aware-variability-first-channel-r", "qfv_brevitas/core/device.py",
      "    rb = r[r0:r1, None, :]\n",
      "    rb = r[:1, None, :]\n",
      ("tests/test_per_channel_core.py", "-k", "variability"),
      "the variability-aware search's candidate values use channel 0's multipliers (torch "
      "path)"),
    M("pc-chip-remap-ignores-channel-axis", "qfv_brevitas/chip/repair.py",
      "        layer.weight.copy_(tq.from_groups(new, layer.weight.shape))\n",
      "        layer.weight.copy_(new.reshape(layer.weight.shape))\n",
      ("tests/test_per_channel_core.py", "-k", "remap_to_valid"),
      "remapping writes the (G, M) rows back without moving the channel axis home (a "
      "transposed conv's weights land in the wrong cells)"),
    M("pc-chip-maps-along-the-first-axis", "qfv_brevitas/core/chip.py",
      "        g = self.layout.to_groups\n",
      "        g = GroupLayout(0 if self.layout.per_channel else -1).to_groups\n",
      ("tests/test_per_channel_core.py", "-k", "stuck_bits"),
      "the chip reads its fault and variability maps along axis 0 whatever the layer's "
      "output axis (a transposed conv's maps land on the wrong channels)"),
    M("pc-quant-nominal-scale-signed", "qfv_brevitas/core/quantizers.py",
      "        return self.multipliers().detach().abs().min(dim=1).values\n",
      "        return self.multipliers().detach().min(dim=1).values\n",
      ("tests/test_per_channel_core.py", "-k", "nearest_own_level"),
      "the nominal per-channel scale is the most negative multiplier, not the smallest |r|"),
    # -- core/convert.py, core/hf.py, studies/ptq.py: embeddings and HF models (issue 24) --------
    M("convert-embeddings-not-edge", "qfv_brevitas/core/convert.py",
      "    return {names[0], names[-1]} | {n for n in names if isinstance(mods[n], nn.Embedding)}\n",
      "    return {names[0], names[-1]}\n",
      ("tests/core/test_convert_embedding.py", "-k", "edge"),
      "a position embedding that is not first gets the inner layers' bits"),
    M("convert-embedding-quant-tensor", "qfv_brevitas/core/convert.py",
      "    new.weight_quant.skip_create_quant_tensor = True\n", "",
      ("tests/core/test_convert_embedding.py", "-k", "brevitas_baseline"),
      "a per-row Brevitas embedding quantizer hands the lookup a quant tensor (Brevitas refuses)"),
    M("baseline-unties-embedding", "qfv_brevitas/studies/ptq.py",
      "build_quant_layer(name, mods[name], wq, act, abits, adopt=True)",
      "build_quant_layer(name, mods[name], wq, act, abits)",
      ("tests/core/test_convert_embedding.py", "-k", "brevitas_baseline"),
      "the Brevitas baseline copies a tied table: embedding and LM head drift apart"),
    M("hf-conv1d-not-transposed", "qfv_brevitas/core/hf.py",
      "w.detach().t().contiguous()", "w.detach().reshape(w.shape[1], w.shape[0]).contiguous()",
      ("tests/core/test_hf_models.py", "-k", "conv1d_is_refused"),
      "GPT-2's Conv1D weight reshaped instead of transposed: a Linear computing something else"),
    # -- core/preserve.py, convert.py: a conversion keeps the model (issue 22) -------------------
    M("convert-copies-instead-of-adopting", "qfv_brevitas/core/convert.py",
      "        new.weight = old.weight\n",
      "        new.weight = nn.Parameter(old.weight.detach().clone())\n",
      ("tests/core/test_convert_preserves.py", "-k", "tied_parameters_stay_one_object"),
      "a converted layer gets a copy of its weight: ties come back untied, frozen becomes "
      "trainable"),
    M("convert-shared-layer-replaced-once", "qfv_brevitas/core/preserve.py",
      "        for parent, key in self.slots[id(old)]:\n",
      "        for parent, key in self.slots[id(old)][:1]:\n",
      ("tests/core/test_convert_preserves.py", "-k", "under_several_names"),
      "a layer held under several names is replaced under its first name only: the others "
      "stay float"),
    M("convert-frozen-not-kept-on-load", "qfv_brevitas/core/preserve.py",
      "            freeze_parts(module, self.parts)\n",
      "            pass\n",
      ("tests/core/test_convert_preserves.py", "-k", "frozen_weights_are_frozen"),
      "a frozen layer's quantizer parameters become trainable again after load_state_dict"),
    M("search-lut-in-half-precision", "qfv_brevitas/core/search.py",
      "LUT_DTYPES = (torch.float32, torch.float64)\n",
      "LUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)\n",
      ("tests/core/test_convert_preserves.py", "-k", "half_precision"),
      "the nearest-level lookup table built in bfloat16 (cell indices rounded out of range)"),
    # -- hostile outputs, names and exit codes (issue 22) --------------------------------------------
    M("outputs-appeared-file-replaced", "qfv_brevitas/util/safeio.py",
      "            _rename_noreplace(tmp, target)\n            return\n",
      "            os.replace(tmp, target)\n            return\n",
      ("tests/util/test_safeio.py", "-k", "appears_before_the_rename or placed_whole"),
      "the last rename replaces a file that appeared after the last look (check-then-rename)"),
    M("outputs-exchange-not-looked-at", "qfv_brevitas/util/safeio.py",
      "        if not stat.S_ISREG(old.st_mode):\n            _exchange(tmp, target)",
      "        if False:\n            _exchange(tmp, target)",
      ("tests/util/test_safeio.py", "-k", "swap_after_the_last_look"),
      "--force replaces a FIFO swapped in after the last look instead of putting it back"),
    M("outputs-special-file-taken-with-force", "qfv_brevitas/util/safeio.py",
      '        if kind == "file" and not stat.S_ISREG(st.st_mode):\n',
      '        if kind == "file" and not stat.S_ISREG(st.st_mode) and not overwrite:\n',
      ("tests/util/test_safeio.py", "-k", "special_file or character_device"),
      "--out a FIFO/socket/device --force passes the check before any work"),
    M("outputs-printable-passes-c1-and-bidi", "qfv_brevitas/util/text.py",
      '    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)\n',
      '    return "".join(ch if ch.isprintable() or ord(ch) > 0x7f else _escape(ch) for ch in s)\n',
      ("tests/util/test_text.py",),
      "C1 controls (CSI 0x9b) and bidi overrides reach the terminal raw"),
    M("outputs-crash-exits-1", "qfv_brevitas/cli/app.py",
      "            return EXIT_CRASH\n",
      "            return EXIT_CHECK_FAILED\n",
      ("tests/cli/test_exit_codes.py", "-k", "crash"),
      "a crash exits 1, the code of 'verify found a difference'"),
    M("outputs-foreign-valueerror-is-bad-input", "qfv_brevitas/cli/app.py",
      "    if isinstance(e, QfvError):  # bad input, an output refused, a check that failed\n"
      "        return e.exit_code, one_line(e)\n",
      "    if isinstance(e, ValueError):  # bad input, an output refused, a check that failed\n"
      "        return getattr(e, 'exit_code', EXIT_BAD_INPUT), one_line(e)\n",
      ("tests/cli/test_exit_codes.py", "-k", "crash or foreign"),
      "numpy's / torch's ValueErrors are shown as bad input (exit 2), naming no file or field"),
    M("outputs-threads-uncapped", "qfv_brevitas/util/threads.py",
      "    if n > top:\n",
      "    if n > MAX_THREADS * 1000:\n",
      ("tests/cli/test_exit_codes.py", "-k", "threads"),
      "--threads 1000000 reaches OpenMP (an abort in libgomp)"),
    # -- per-channel export paths (issue 27): channels of different sign, scale and size -------
    M("pc-fixed-r-of-channel-0", "qfv_brevitas/export/fixedpoint.py",
      "    mr = (info.r.double() * s).round()\n",
      "    mr = (info.r.double()[:1] * s).round().expand_as(info.r)\n",
      ("tests/export/test_per_channel.py", "-k",
       "file_weights or metadata_holds or widths_and_rounding"),
      "fixed point: every channel rounded with channel 0's multipliers (file and reference agree)"),
    M("pc-fixed-offsets-channels-reversed", "qfv_brevitas/export/fixedpoint.py",
      "    mc = (info.c.double() * s).round()\n",
      "    mc = (info.c.double().flip(0) * s).round()\n",
      ("tests/export/test_per_channel.py", "-k", "file_weights or metadata_holds"),
      "fixed point: the offsets rounded in reversed channel order"),
    M("pc-fixed-width-of-channel-0", "qfv_brevitas/export/fixedpoint.py",
      "    lo, hi = int(table.min()), int(table.max())\n",
      "    lo, hi = int(table[0].min()), int(table[0].max())\n",
      ("tests/export/test_per_channel.py", "-k", "widths_and_rounding"),
      "fixed point: the integer width sized by channel 0's levels only"),
    M("pc-fixed-check-levels-of-channel-0", "qfv_brevitas/export/forms/fixed.py",
      "            if not np.isin(g[i], table[i if table.shape[0] > 1 else 0]).all():\n",
      "            if not np.isin(g[i], table[0]).all():\n",
      ("tests/export/test_per_channel.py", "-k", "graph_tamper"),
      "the fixed form's check tests every channel's weights against channel 0's levels"),
    M("pc-compact-check-c-of-channel-0", "qfv_brevitas/export/forms/compact.py",
      "        if not same(gc, c):\n",
      "        if not same(gc[:1], c[:1]):\n",
      ("tests/export/test_per_channel.py", "-k", "tamper"),
      "the compact form's check compares channel 0's offset only"),
    M("pc-planes-check-multipliers-of-channel-0", "qfv_brevitas/export/forms/planes.py",
      "        if v is None or not same(v, m[:, k]):\n",
      "        if v is None or not same(np.asarray(v).reshape(-1)[:1], m[:1, k]):\n",
      ("tests/export/test_per_channel.py", "-k", "graph_tamper"),
      "the planes form's check compares channel 0's plane multipliers only"),
    M("pc-planes-offset-width-of-channel-0", "qfv_brevitas/export/forms/planes.py",
      "                     offset_bits=_signed_width(mc.tolist()),\n",
      "                     offset_bits=_signed_width(mc[:1].tolist()),\n",
      ("tests/export/test_per_channel.py", "-k", "widths_and_rounding"),
      "planes: the integer offsets' width sized by channel 0's offset only"),
    M("pc-bitplanes-r-of-channel-0", "qfv_brevitas/export/forms/bitplanes.py",
      "        self.rk = [i.broadcast(i.r[:, k].contiguous()) for k in range(i.bits)]\n",
      "        self.rk = [i.broadcast(i.r[:1, k].expand(i.r.shape[0]).contiguous())\n"
      "                   for k in range(i.bits)]\n",
      ("tests/export/test_per_channel.py", "-k", "file_weights"),
      "bit planes: every channel's planes scaled by channel 0's multipliers"),

    # -- the command line (issue 23) ------------------------------------------------------------
    M("cli-config-after-command-line", "qfv_brevitas/cli/configfile.py",
      "    return rest[:start] + config_tokens(_read(path), parser, path) + rest[start:]\n",
      "    return rest + config_tokens(_read(path), parser, path)\n",
      ("tests/cli/test_cli_surface.py", "-k", "config_yaml_and_json"),
      "--config: the file's options placed after the command line's, so the file wins"),
    M("cli-renamed-outside-either-or-group", "qfv_brevitas/cli/common.py",
      "                              if action in g._group_actions), p)\n",
      "                              if action in g._group_actions and False), p)\n",
      ("tests/cli/test_cli_surface.py", "-k", "old_option_names"),
      "an old option name added outside its new name's either-or group (a required group "
      "then refuses it)"),
    M("cli-help-description-list-default", "qfv_brevitas/cli/helpspec.py",
      "        return [_text(v) for v in value]\n",
      "        return str(value)\n",
      ("tests/cli/test_cli_surface.py", "-k", "help_shows_each_default or stored_help"),
      "the stored help description writes a list default as its repr ([0, 0.05]), unlike the "
      "real parser"),
    M("cli-quiet-keeps-progress", "qfv_brevitas/cli/common.py",
      "    if quiet and hasattr(args, \"no_progress\"):\n",
      "    if False and quiet and hasattr(args, \"no_progress\"):\n",
      ("tests/cli/test_cli_surface.py", "-k", "quiet"),
      "-q leaves the progress bars on"),
    M("cli-broken-pipe-is-a-system-error", "qfv_brevitas/cli/app.py",
      "    except BrokenPipeError:\n        _quiet_stdout()\n        return EXIT_BROKEN_PIPE\n"
      "    except (Exception, KeyboardInterrupt) as e:\n",
      "    except (Exception, KeyboardInterrupt) as e:\n",
      ("tests/cli/test_cli_surface.py", "-k", "reader_that_goes_away"),
      "a reader that went away reported as a system error (exit 4, a message)"),

    # -- plugins and a user's own code (issue 23) --------------------------------------------------
    M("plugins-any-allow-list-allows", "qfv_brevitas/util/plugins.py",
      "        return allow == spec\n",
      "        return bool(allow)\n",
      ("tests/util/test_plugins.py::test_the_small_helpers",
       "tests/cli/test_usercode.py::test_your_own_model_and_data_train_and_need_consent_to_load"),
      "a checkpoint's module:function is imported when any other function was allowed"),
    M("plugins-built-in-name-taken-over", "qfv_brevitas/util/plugins.py",
      "    taken = sorted(set(found) & set(builtins))\n",
      "    taken = []\n",
      ("tests/util/test_plugins.py", "-k", "built_in_name"),
      "a plugin may claim a built-in name (a command line changes meaning)"),
    M("plugins-entry-points-read-every-lookup", "qfv_brevitas/util/plugins.py",
      "    if group not in _FOUND:\n",
      "    if True:\n",
      ("tests/util/test_plugins.py", "-k", "read_once"),
      "the installed distributions are scanned again at every registry lookup"),
    M("experiment-output-width-unchecked", "qfv_brevitas/studies/experiment.py",
      "    check_model_fits(fp, plan.arch, data.shape, data.num_classes)\n",
      "    check_model_fits(fp, plan.arch, data.shape)\n",
      ("tests/cli/test_usercode.py", "-k", "does_not_fit"),
      "a user's model with the wrong number of outputs trains on silently"),

    # -- studies/figstyle.py, plots.py, scenario.py: pictures and the HRS leak (issue 23) --------
    M("fig-selftuned-row-own-colour", "qfv_brevitas/studies/figstyle.py",
      "    base = base_method(name)\n    order = list(METHOD_LABELS)\n",
      "    base = name\n    order = list(METHOD_LABELS)\n",
      ("tests/studies/test_plots.py", "-k", "keeps_its_colour"),
      "a self-tuned row ('paper+selftune') gets a colour of its own, not its method's"),
    M("fig-colour-by-salted-hash", "qfv_brevitas/studies/figstyle.py",
      "EXTRA_PALETTE[zlib.crc32(base.encode()) % len(EXTRA_PALETTE)]",
      "EXTRA_PALETTE[hash(base) % len(EXTRA_PALETTE)]",
      ("tests/studies/test_plots.py", "-k", "stable_colour"),
      "a plugin method's colour from Python's salted hash: another colour in every run"),
    M("fig-legend-over-the-data", "qfv_brevitas/studies/plots.py",
      'fig.legend(handles, labels, loc="outside lower center"',
      'fig.legend(handles, labels, loc="lower center"',
      ("tests/studies/test_plots.py",),
      "the figures' legend drawn over the panels"),
    M("hrs-leak-dropped-at-sigma-0", "qfv_brevitas/studies/scenario.py",
      "(self.hrs_on_off is not None or self.chip_sigma",
      "(self.chip_sigma",
      ("tests/studies/test_engine.py", "-k", "hrs_leak"),
      "sigma 0 with an HRS leak run as the ideal device (the cliff of issue 23)"),
    M("lm-split-not-by-file", "qfv_brevitas/zoo/data.py",
      "        parts[zlib.crc32(rel.encode()) % TEXT_VALIDATION_ONE_IN == 0].append(data + b\"\\0\")\n",
      "        parts[len(parts[1]) * TEXT_VALIDATION_ONE_IN < len(parts[0])].append(data + b\"\\0\")\n",
      ("tests/zoo/test_text.py", "-k", "split"),
      "validation files chosen by their position in the list: adding a file moves others"),
    M("lm-targets-not-shifted", "qfv_brevitas/zoo/data.py",
      "    return TensorDataset(win[:, :-1].contiguous(), win[:, 1:].contiguous())\n",
      "    return TensorDataset(win[:, :-1].contiguous(), win[:, :-1].contiguous())\n",
      ("tests/zoo/test_text.py", "-k", "next_byte"),
      "the targets are the inputs, not the next bytes"),
    M("lm-bpb-in-nats", "qfv_brevitas/training/lm.py",
      "    return lm_loss(outputs, targets).detach() / math.log(2.0)\n",
      "    return lm_loss(outputs, targets).detach()\n",
      ("tests/training/test_lm_metrics.py",),
      "bits per byte reported in nats"),
    M("lm-chip-trials-share-a-map", "qfv_brevitas/studies/lm.py",
      "                m = sc.attach(copy.deepcopy(model), seed, t, layers)\n",
      "                m = sc.attach(copy.deepcopy(model), seed, 0, layers)\n",
      ("tests/studies/test_lm.py", "-k", "chip_sweep"),
      "every Monte Carlo trial of the LM draws the same map"),
    M("lm-ptq-scored-by-accuracy", "qfv_brevitas/studies/ptq.py",
      "    evaluate = partial(PTQ_METRICS[result.metric][0], batch_size=batch_size)\n",
      "    evaluate = partial(PTQ_METRICS[\"accuracy\"][0], batch_size=batch_size)\n",
      ("tests/studies/test_lm.py", "-k", "ptq_scores"),
      "a language model's PTQ scored by top-1 accuracy instead of bits per byte"),
]


# -- running -------------------------------------------------------------------------------------

def _repo_files() -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _copy_repo(dest: Path, files: Sequence[str]) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "")
                                                         .split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode between a file and its mutant
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pytest(copy: Path, args: Sequence[str], timeout: int) -> Tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return -1, f"timed out after {timeout} s\n{e.stdout or ''}"
    return p.returncode, p.stdout + p.stderr


def _check_snippet(m: Mutant) -> Optional[str]:
    path = ROOT / m.file
    if not path.exists():
        return f"file {m.file} does not exist"
    n = path.read_text().count(m.original)
    if n == 0:
        return f"snippet not found in {m.file}"
    if n > 1:
        return f"snippet occurs {n} times in {m.file} (must be unique)"
    if m.original == m.replacement:
        return "replacement equals the snippet"
    return None


@dataclass
class Result:
    mutant: Mutant
    status: str  # caught | NOT CAUGHT | MISSING | ERROR
    detail: str
    seconds: float
    output: str = ""


def _first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else ""


def run_mutant(m: Mutant, base: Path, timeout: int) -> Result:
    t0 = time.perf_counter()
    problem = _check_snippet(m)
    if problem:
        return Result(m, "MISSING", problem, 0.0)
    with tempfile.TemporaryDirectory(prefix=f"qfv-mut-{m.id}-") as d:
        copy = Path(d) / "repo"
        shutil.copytree(base, copy)
        target = copy / m.file
        target.write_text(target.read_text().replace(m.original, m.replacement, 1))
        rc, out = _pytest(copy, m.tests, timeout)
    secs = time.perf_counter() - t0
    if rc == 1:
        return Result(m, "caught", _first_failure(out), secs, out)
    if rc == 0:
        return Result(m, "NOT CAUGHT", "every selected test passed", secs, out)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return Result(m, "ERROR", f"pytest exit {rc}: {tail}", secs, out)


def _table(results: Sequence[Result], markdown: bool) -> str:
    rows = [(r.mutant.id, r.mutant.file.replace("qfv_brevitas/", ""), r.status,
             r.detail.replace("tests/", ""), f"{r.seconds:.0f}") for r in results]
    head = ("mutant", "file", "result", "caught by / why", "s")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"`{c}`" if i in (0, 3) and c else c
                                    for i, c in enumerate(row)) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*row) for row in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    p.add_argument("--jobs", "-j", type=int, default=2, help="mutants run at once (default 2)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip checking that the selected tests pass on the unmutated copy")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print each mutant's test output")
    args = p.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTANTS}
        if unknown:
            p.error(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.id in args.only]
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), "mutant ids must be unique"
    if args.list:
        for m in mutants:
            print(f"{m.id:<44} {m.file:<34} {m.what}\n{'':<44} tests: {' '.join(m.tests)}")
        return 0

    missing = [(m, _check_snippet(m)) for m in mutants]
    missing = [(m, why) for m, why in missing if why]
    for m, why in missing:
        print(f"!!! MISSING {m.id}: {why}. The code changed: update this mutant in "
              f"tools/mutation.py (file, snippet, tests).", file=sys.stderr)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qfv-mut-base-") as d:
        base = Path(d) / "repo"
        base.mkdir()
        _copy_repo(base, _repo_files())
        probe = subprocess.run([sys.executable, "-c", "import qfv_brevitas; "
                                "print(qfv_brevitas.__file__)"], cwd=base, env=_env(base),
                               capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(base)):
            print(f"!!! the copy's package is not the one imported ({probe.stdout.strip()} "
                  f"{probe.stderr.strip()[-500:]}): mutants would not be tested", file=sys.stderr)
            return 2
        runnable = [m for m in mutants if m not in {mm for mm, _ in missing}]
        if not args.no_baseline and runnable:
            # each distinct selection must pass on the unmutated copy, or "caught" means nothing
            selections = list(dict.fromkeys(m.tests for m in runnable))
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                outcomes = list(pool.map(lambda t: _pytest(base, t, args.timeout), selections))
            failed = [(t, rc, out) for t, (rc, out) in zip(selections, outcomes) if rc != 0]
            for t, rc, out in failed:
                print(f"!!! baseline: {' '.join(t)} fails without any mutation (exit {rc}):\n"
                      f"{out[-3000:]}", file=sys.stderr)
            if failed:
                return 2
            print(f"baseline: {len(selections)} test selections pass unmutated "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results: List[Result] = [Result(m, "MISSING", why, 0.0) for m, why in missing]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for r in pool.map(lambda m: run_mutant(m, base, args.timeout), runnable):
                print(f"  {r.status:<10} {r.mutant.id} ({r.seconds:.0f} s)", flush=True)
                if args.verbose:
                    print(r.output)
                results.append(r)
    order = {m.id: i for i, m in enumerate(MUTANTS)}
    results.sort(key=lambda r: order[r.mutant.id])
    caught = sum(r.status == "caught" for r in results)
    print()
    print(_table(results, args.markdown))
    print(f"\n{caught}/{len(results)} mutants caught ({time.perf_counter() - t0:.0f} s, "
          f"{args.jobs} at a time)")
    bad = [r for r in results if r.status != "caught"]
    if bad:
        print("!!! " + ", ".join(f"{r.mutant.id}: {r.status}" for r in bad), file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
