"""Hand-made bugs (mutants) that the default suite once let through, and the tests that now kill them;
and a bug in every guard of every pass (each pass lists its guards in its module docstring), in the
verdict and in the post-processing probe.

Each mutant is a one-line textual replacement in the package, found by an exact pattern that must occur
exactly once (anything else stops the script: the code moved and the mutant must be updated).  The
repository is copied to a temporary directory (without .venv, .git and caches); each mutant is applied to
that copy, its named tests run there with this Python and ``PYTHONPATH`` pointing at the copy (checked:
``bnfuse_cli`` must import from the copy, mutated line included), and the file is restored.  The named
tests are first run on the unmutated copy, where they must pass.

    .venv/bin/python scripts/mutants.py            # all
    .venv/bin/python scripts/mutants.py --only site-prefix zero-pads-all

All of them take about 10 minutes on two CPU cores (each mutant runs only its named tests; 137 on 2026-12-07).

A mutant of a data-flow guard (``site``: the pass takes a site whose removed value something else reads, or
whose layer also runs without it) must also fail its own site check, not only the end-to-end comparison:
``tests/test_site_flow.py``'s case for it, which fuses with the outputs' tolerance out of the way, must fail.

Exit status: 0 when every mutant that could run was killed, 1 when one survived, 2 when the script could
not do its job (pattern not found once, tests not passing unmutated, the copy not imported).  A mutant that
only a CUDA GPU can show is listed and skipped where CUDA is unavailable.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]
    needs_cuda: bool = False
    #: a wrong-model bug of a data-flow guard: it must also fail its own site check (:data:`SITE`)
    site: bool = False


MUTANTS = [
    Mutant(
        "zero-pads-all", "a conv padded on one axis only counts as not padding",
        "bnfuse_cli/engine/guards.py",
        "    return any(p != 0 for p in pad)\n",
        "    return all(p != 0 for p in pad)\n",
        ("tests/test_graph_cases.py::test_input_bn_not_folded_into_a_conv_padded_on_one_axis_or_one_side",),
    ),
    Mutant(
        "site-rtol-100x", "the float32 site tolerance 100 times looser",
        "bnfuse_cli/checks/outputs.py",
        '    "float32": (1e-4, 1e-6, 1e-5),\n',
        '    "float32": (1e-4, 1e-6, 1e-3),\n',
        ("tests/test_judge.py::test_site_check_tolerance_is_pinned_from_both_sides",),
    ),
    Mutant(
        "site-prefix", "site checks dropped for a layer whose name merely starts with a merged branch's",
        "bnfuse_cli/checks/sites.py",
        'spec.layer.startswith(c + ".") for other in specs',
        "spec.layer.startswith(c) for other in specs",
        ("tests/test_merge.py::test_a_fold_named_like_a_merged_branch_is_still_checked",),
    ),
    Mutant(
        "weight-overflow-silent", "the fp16 weight-overflow check never fires (finiteness tested in float64)",
        "bnfuse_cli/engine/affine.py",
        "    if not bool(torch.isfinite(torch.tensor(worst, dtype=torch.float64).to(w.dtype))):\n",
        "    if not bool(torch.isfinite(torch.tensor(worst, dtype=torch.float64).to(torch.float64))):\n",
        ("tests/test_fold_math.py::test_fp16_overflow_of_the_folded_weight_is_detected",),
    ),
    Mutant(
        "zip-unchecked", "read_checkpoint skips the CRC-32 check of a .pth zip (only a .zip suffix is checked)",
        "bnfuse_cli/files/integrity.py",
        "    if looks_zipped(path):\n        _check_zip_records(path, what)\n",
        '    if path.suffix.lower() == ".zip":\n        _check_zip_records(path, what)\n',
        ("tests/test_checkpoint.py::test_damaged_files_always_give_a_checkpoint_error",
         "tests/test_faults.py::test_flipped_byte_in_a_tensor_record_is_refused_naming_it"),
    ),
    Mutant(
        "merge-rank", "merge_kernels accepts a branch kernel of another rank (broadcast into the sum)",
        "bnfuse_cli/engine/passes/merge/kernels.py",
        "        if w.shape[:2] != weight.shape[:2] or w.dim() != weight.dim():\n",
        "        if w.shape[:2] != weight.shape[:2]:\n",
        ("tests/test_merge_math.py::test_merge_kernels_refuses_a_branch_of_another_rank",),
    ),
    Mutant(
        "merge-bias-length", "merge_kernels accepts a bias of the wrong length (broadcast into the sum)",
        "bnfuse_cli/engine/passes/merge/kernels.py",
        "        if b is not None and tuple(b.shape) != (out_ch,):\n",
        "        if b is not None and b.dim() != 1:\n",
        ("tests/test_merge_math.py::test_merge_kernels_refuses_a_bias_of_the_wrong_length",),
    ),
    Mutant(
        "verify-ignores-device", "verify runs on the CPU whatever --device says",
        "bnfuse_cli/workflows/verify.py",
        "_validate(samples, data, batch_size, device, dtype,",
        '_validate(samples, data, batch_size, "cpu", dtype,',
        ("tests/test_gpu.py::test_verify_cuda_really_runs_on_the_gpu",),
        needs_cuda=True,
    ),
    Mutant(
        "pt2-sample-inputs-unpickled", "a .pt2's sample inputs that torch.load(weights_only=True) refuses pass the "
        "archive check (torch.export.load then unpickles them in full)",
        "bnfuse_cli/files/pt2archive.py",
        "    buf = io.BytesIO(data)\n",
        "    return None\n",
        ("tests/test_pt2_guard.py::test_sample_inputs_that_run_code_are_refused_by_verify_and_load",),
    ),
    Mutant(
        "pt2-second-open", "torch.export.load opens the .pt2 again by path instead of reading the file checked",
        "bnfuse_cli/files/export.py",
        "ep = torch.export.load(fh, extra_files=extra)",
        "ep = torch.export.load(str(path), extra_files=extra)",
        ("tests/test_pt2_guard.py::test_the_archive_torch_loads_is_the_one_that_was_checked",),
    ),
    Mutant(
        "pt2-zip-bomb", "a .pt2 member may claim any size from a few bytes on disk",
        "bnfuse_cli/files/pt2archive.py",
        "        if info.file_size > MAX_EXPANSION * info.compress_size + _SLACK:\n",
        "        if False:\n",
        ("tests/test_pt2_guard.py::test_a_zip_bomb_is_refused_in_seconds_before_anything_is_inflated",),
    ),
    Mutant(
        "pt2-guard-code", "a .pt2's input guards pass unchecked (ep.module() compiles them with exec)",
        "bnfuse_cli/files/pt2graph.py",
        "        why = _guard_problem(guard)\n",
        "        why = None\n",
        ("tests/test_pt2_guard.py::test_graph_parts_torch_would_run_as_python_are_refused",),
    ),
    Mutant(
        "proof-tolerance", "the read-back proof of a .pt2/.onnx compares weights within a tolerance, not bit for bit",
        "bnfuse_cli/files/export.py",
        "    return torch.equal(raw(a), raw(b))\n",
        "    return torch.allclose(a.detach().cpu().double(), b.detach().cpu().double())\n",
        ("tests/test_export.py::test_the_read_back_proof_is_bit_for_bit",),
    ),
    Mutant(
        "onnx-pair-half-placed", "an interrupt between placing an ONNX model's data file and the model leaves the "
        "data file",
        "bnfuse_cli/files/place.py",
        "        for path in added:\n            _remove(path)\n",
        "        pass\n",
        ("tests/test_onnx_external.py::test_an_interrupt_between_the_two_placements_leaves_neither",),
    ),
]


# ----------------------------------------------------------------------------- a bug in every guard of every pass
# Each pass lists its guards in its module docstring ("Guards:"); each guard has a mutant here that takes it
# out, and the tests that must then fail (tests/test_guards.py trips the guards no older test tripped).

GUARDS = "tests/test_guards.py::test_each_guard_refuses_with_its_reason_and_the_model_stays_exact[{}]"
CASES = "tests/test_graph_cases.py::"
FIND, SHARED = "bnfuse_cli/engine/passes/fold/find.py", "bnfuse_cli/engine/guards.py"
STD, CHAIN, LAYOUT = ("bnfuse_cli/engine/passes/standardise.py", "bnfuse_cli/engine/passes/chain.py",
                      "bnfuse_cli/engine/passes/layout.py")
FUNCTIONAL, CLONE, UNWRAP = ("bnfuse_cli/engine/passes/functional.py", "bnfuse_cli/engine/passes/clone.py",
                             "bnfuse_cli/engine/passes/unwrap.py")
MERGE, BRANCHES = "bnfuse_cli/engine/passes/merge/find.py", "bnfuse_cli/engine/passes/merge/branches.py"
SCALE, HORIZONTAL = "bnfuse_cli/engine/passes/scale/find.py", "bnfuse_cli/engine/passes/horizontal.py"
MUST_NOT_MERGE = "tests/test_merge.py::test_must_not_merge_stays_exact_with_its_reason"
MUST_STAY = "tests/test_scale.py::test_a_scale_that_must_stay_is_exact_and_says_why"
ALIKE = "tests/test_guards.py::test_sibling_activations_alike_by_type_but_not_in_their_parameters_run_per_slice"
FUNCTIONAL_NAMED = "tests/test_functional_bn.py::test_functional_batch_norms_fold_or_are_named"
UNWRAPPED = "tests/test_unwrap.py::test_each_wrapper_of_one_call_becomes_its_layer_exactly"
FLOW = "bnfuse_cli/checks/flow.py"
WRONG_SITE = "tests/test_site_flow.py::test_a_site_the_original_does_not_run_as_claimed_fails_by_name"
FLOW_PASSES = "tests/test_site_flow.py::test_accumulating_in_place_sharing_an_activation_and_reading_a_shape_pass"
FLOW_SHARED = "tests/test_site_flow.py::test_the_same_sites_on_models_that_run_as_claimed_pass"
SITE = "tests/test_site_flow.py::test_the_sites_alone_refuse_what_a_data_flow_guard_refuses[{}]"
#: the data-flow guards (tests/test_site_flow.py's GUARDED): each must fail its site check when broken
SITE_GUARDS = frozenset({
    "fold-other-reader", "fold-called-elsewhere", "fold-fwd-other-reader", "fold-fwd-returned",
    "fold-fwd-called-elsewhere", "chain-layer-read-elsewhere", "chain-called-twice", "layout-read-elsewhere",
    "layout-called-elsewhere", "fn-returned", "fn-called-twice", "merge-read-elsewhere",
    "scale-layer-called-twice", "scale-layer-returned", "scale-fwd-returned", "scale-fwd-called-elsewhere",
    "scale-op-layer-read", "horiz-activation-read-elsewhere"})
NOT_SIBLINGS = "tests/test_guards.py::test_a_layer_called_twice_or_with_tied_weights_is_no_sibling"


def _g(*ids: str) -> tuple[str, ...]:
    return tuple(GUARDS.format(i) for i in ids)


def _guard(name: str, what: str, path: str, pattern: str, replacement: str, *tests: str) -> Mutant:
    return Mutant(name, what, path, pattern, replacement, tuple(tests) or _g(name))


MUTANTS += [
    # fold: backward
    _guard("fold-never-called", "a BatchNorm never called is planned", FIND,
           '    if not calls:\n        return "never called', '    if False:\n        return "never called',
           CASES + "test_data_dependent_control_flow"),
    _guard("fold-training", "a BatchNorm the model switches to training mode folds", FIND,
           "    if any(c.training for c in calls):", "    if False:", CASES + "test_hidden_reads_keep_the_bn"),
    _guard("fold-norm-read-elsewhere", "a BatchNorm whose parameters are read elsewhere folds", SHARED,
           "    problem = _foreign_read(module, rec)\n", "    problem = None\n",
           CASES + "test_bn_parameters_read_elsewhere", CASES + "test_bn_used_functionally_is_skipped_with_the_reader"),
    _guard("fold-norm-pre-hooks", "a BatchNorm with forward pre-hooks folds", SHARED,
           '    if _user_hooks(module._forward_pre_hooks, rec):\n        return "it has',
           '    if False:\n        return "it has'),
    _guard("fold-norm-hooks", "a BatchNorm with forward hooks folds", SHARED,
           '    if _user_hooks(module._forward_hooks, rec):\n        return "it has',
           '    if False:\n        return "it has'),
    _guard("fold-reshape-axis", "a reshape that moves the channel axis is folded through", FIND,
           "        if not keeps or x.dtype != src.dtype:", "        if x.dtype != src.dtype:"),
    _guard("fold-cat-axis", "a cat along another axis is folded through", FIND,
           "if not isinstance(dim, int) or dim % max(x.dim(), 1) != 1:", "if not isinstance(dim, int):",
           CASES + "test_cat_along_another_axis_is_skipped"),
    _guard("fold-cat-read-elsewhere", "a cat read elsewhere too is folded through", FIND,
           '            if other is not None:\n                return [], f"{what}',
           '            if False:\n                return [], f"{what}'),
    _guard("fold-cat-returned", "a cat also returned is folded through", FIND,
           '            if id(x) in out_ids:\n                return [], f"{what}',
           '            if False:\n                return [], f"{what}'),
    _guard("fold-other-reader", "a layer whose output is read elsewhere too (a residual) takes the fold", FIND,
           '            if other is not None:\n                return [], f"output of',
           '            if False:\n                return [], f"output of',
           CASES + "test_residual_reader_is_named", CASES + "test_cat_part_also_read_elsewhere_is_skipped"),
    _guard("fold-output-returned", "a layer whose output is also returned takes the fold", FIND,
           "            if id(seg.src) in out_ids:", "            if False:", CASES + "test_conv_output_returned"),
    _guard("fold-channels-per-call", "a layer giving other channels of one BatchNorm on two calls folds", FIND,
           "if ranges.setdefault(id(p), (seg.start, seg.stop)) != (seg.start, seg.stop):",
           "if ranges.setdefault(id(p), (seg.start, seg.stop)) is None:"),
    _guard("fold-called-elsewhere", "a layer called twice, the BatchNorm after one call, takes the fold", FIND,
           "        if any(id(c.output) not in fed for c in pcalls):", "        if False:",
           CASES + "test_conv_called_twice_bn_after_one_call"),
    _guard("fold-parametrize", "a re-parametrised layer takes a fold", SHARED,
           "    if parametrize.is_parametrized(module):", "    if False:",
           CASES + "test_parametrize_is_skipped", CASES + "test_parametrizations_weight_norm_is_skipped"),
    _guard("fold-weight-norm", "an old weight_norm layer is refused for its pre-hook only", SHARED,
           "    if any(isinstance(h, WeightNorm) for h in pre_hooks):", "    if False:",
           CASES + "test_old_weight_norm_is_skipped"),
    _guard("fold-unknown-layer", "a layer subclass with its own forward takes a fold", SHARED,
           '    if rule is None:\n        return f"{name}: {reason}"', '    if False:\n        return f"{name}: {reason}"',
           CASES + "test_conv_subclass_overriding_conv_forward_is_skipped"),
    _guard("fold-layer-pre-hooks", "a layer with forward pre-hooks takes a fold", SHARED,
           "    if pre_hooks:\n", "    if False:\n"),
    _guard("fold-layer-hooks", "a layer with forward hooks takes a fold", SHARED,
           '    if _user_hooks(module._forward_hooks, rec):\n        return f"{name} has',
           '    if False:\n        return f"{name} has'),
    _guard("fold-tied", "a layer with tied weights takes a fold", SHARED,
           "        if others:\n", "        if False:\n", CASES + "test_tied_conv_weights"),
    _guard("fold-shared-memory", "a layer whose weight shares memory with another tensor takes a fold", SHARED,
           "        if len(users) > 1:", "        if False:",
           CASES + "test_weight_sharing_memory_with_another_parameter_is_skipped"),
    _guard("fold-weight-read-elsewhere", "a layer whose weight is read elsewhere takes a fold", SHARED,
           "    return _shared_with(module, rec) or _foreign_read(module, rec)", "    return _shared_with(module, rec)",
           CASES + "test_conv_weight_read_by_another_module"),
    _guard("fold-linear-3d", "a BatchNorm1d on axis 1 of a Linear's 3-D output folds on its features", FIND,
           '            if rule.kind == "linear" and out.dim() != 2:', "            if False:",
           CASES + "test_linear_on_3d_then_bn1d_is_not_folded_on_the_wrong_axis"),
    # fold: forward
    _guard("fold-fwd-norm-act", "a norm-plus-activation folds into the layer after its activation", FIND,
           '    if replacement != "identity":\n        return None, None', '    if False:\n        return None, None'),
    _guard("fold-fwd-different-layers", "a BatchNorm whose calls feed different layers folds into one", FIND,
           "        if target is not None and r0.module is not target:", "        if False:"),
    _guard("fold-fwd-other-reader", "a BatchNorm whose output is read elsewhere too folds forward", FIND,
           "        if others:\n            r, op = others[0]", "        if False:\n            r, op = others[0]"),
    _guard("fold-fwd-returned", "a BatchNorm whose output is returned too folds forward", FIND,
           "        elif id(y) in out_ids:", "        elif False:"),
    _guard("fold-fwd-called-elsewhere", "a BatchNorm folds forward into a layer that also reads other inputs", FIND,
           "    if any(id(c.input) not in norm_outputs for c in rec.calls.get(id(target), [])):", "    if False:"),
    _guard("fold-fwd-layer-problem", "a BatchNorm folds forward into a re-parametrised layer", FIND,
           "    problem = producer_problem(target, rec)\n", "    problem = None\n",
           CASES + "test_input_bn_before_parametrized_conv_is_skipped"),
    _guard("fold-fwd-transposed", "a BatchNorm folds forward into a ConvTranspose", FIND,
           "    if rule is None or not rule.next_ok:", "    if rule is None:"),
    _guard("fold-fwd-zero-pad", "a BatchNorm folds forward into a zero-padded conv", FIND,
           '    if rule.kind == "conv" and zero_pads(target):', "    if False:",
           CASES + "test_input_bn_not_folded_into_zero_padded_conv"),
    _guard("fold-fwd-linear-3d", "a BatchNorm1d folds forward into a Linear over another axis", FIND,
           '        if rule.kind == "linear" and c.output.dim() != 2:', "        if False:"),
    # standardise
    _guard("std-same-pad", "a conv padding at run time (TF SAME) becomes a plain conv", STD,
           '            if rule.same and getattr(m, "same_pad", False):', "            if False:"),
    _guard("std-never-called", "a standardising conv never called is replaced", STD,
           "            elif not rec.calls.get(id(m)):", "            elif False:"),
    _guard("std-hooks", "a standardising conv with hooks is replaced, its hooks dropped", STD,
           "            elif why := hooks(m, name, rec):  # a plain conv takes its place", "            elif False:"),
    # chain (engine/passes/chain.py: its guards are listed in tests/test_guards.py)
    _guard("chain-read-elsewhere", "a chain step whose result is read elsewhere too is folded", CHAIN,
           '        if len(node.users) != 1:\n            return None, [], [], f"the result',
           '        if False:\n            return None, [], [], f"the result'),
    _guard("chain-operand-order", "c - y and c / y are read as y - c and y / c", CHAIN,
           '            src, const, op = b, a, _REVERSED[op]',
           '            src, const = b, a',
           "tests/test_chain.py", "tests/test_guards.py::test_a_constant_on_the_left_of_minus_or_divide_is_never_read_as_"
           "on_the_right"),
    _guard("chain-not-constant", "a step by a computed value is folded", CHAIN,
           '    return None, "it is not a constant (a number, or a parameter, buffer or tensor attribute of the block)"',
           '    return getattr(arg, "name", arg), None',
           "tests/test_chain.py::test_an_affine_chain_folds_with_its_batchnorm"),
    _guard("chain-not-per-channel", "a step by a tensor of one value per position is folded", CHAIN,
           "        if t.numel() != 1 and (per_channel_axis(t, rank) != 1 or t.numel() != channels):",
           "        if False:"),
    _guard("chain-layer-read-elsewhere", "a chain on a conv output read elsewhere too is folded", CHAIN,
           '    if getattr(node, "op", None) != "call_module" or len(node.users) != 1:',
           '    if getattr(node, "op", None) != "call_module":'),
    _guard("chain-not-conv", "a chain after a Linear on (N, C, L) is folded on its features", CHAIN,
           '        if rule.kind != "conv" or rule.transposed:', "        if rule.transposed:"),
    _guard("chain-called-twice", "a chain after a conv called twice is folded", CHAIN,
           '        if len(calls) != 1:\n            return f"{producer} is called',
           '        if False:\n            return f"{producer} is called'),
    _guard("chain-kept", "a chain after a conv whose output is kept is folded", CHAIN,
           '        if out is not None and id(out) in escapes:\n            return f"the output of {producer}',
           '        if False:\n            return f"the output of {producer}'),
    # layout
    _guard("layout-norm-problem", "a BatchNorm with hooks folds through layout ops", LAYOUT,
           "                    or calls[0].training or norm_problem(norm, rec) or not rec.moved",
           "                    or calls[0].training or not rec.moved", *_g("layout-norm-hooks")),
    _guard("layout-training", "a BatchNorm in training mode folds through layout ops", LAYOUT,
           "                    or calls[0].training or norm_problem(norm, rec) or not rec.moved",
           "                    or norm_problem(norm, rec) or not rec.moved"),
    _guard("layout-read-elsewhere", "a BatchNorm whose output (or a step's) is read elsewhere folds through layout ops",
           "bnfuse_cli/engine/reach.py", "        if len(reads) != 1:\n", "        if len(reads) != 1 and False:\n",
           *_g("layout-read-elsewhere", "layout-step-read-elsewhere")),
    _guard("layout-returned", "a BatchNorm folds through layout ops whose result is returned",
           "bnfuse_cli/engine/reach.py", "        if steps and id(x) in escapes:", "        if False:"),
    _guard("layout-called-elsewhere", "a BatchNorm folds through layout ops into a Linear called elsewhere", LAYOUT,
           "    if n != 1:\n        return f\"{reader.name} is called {n} times\"", "    if False:\n        return \"\""),
    _guard("layout-layer-problem", "a BatchNorm folds through layout ops into a Linear with tied weights", LAYOUT,
           "    return producer_problem(reader.module, rec)", "    return None"),
    _guard("layout-merged-axis", "a flatten merging the channels with the positions is followed",
           "bnfuse_cli/engine/reach.py",
           "        if start <= axis <= end and start != end:", "        if False:",
           "tests/test_layout.py::test_a_flatten_that_merges_the_channels_keeps_the_batchnorm"),
    _guard("layout-not-features", "a BatchNorm folds into a Linear over the positions", "bnfuse_cli/engine/reach.py",
           "            if axis == len(x.shape) - 1:\n                return Reach(reader, steps)",
           "            if True:\n                return Reach(reader, steps)"),
    # functional
    _guard("fn-training", "a functional batch norm with batch statistics folds", FUNCTIONAL,
           "    if call.training:", "    if False:", FUNCTIONAL_NAMED),
    _guard("fn-affine-not-held", "a functional batch norm with a computed weight folds without it", FUNCTIONAL,
           "    if call.unresolved:", "    if False:"),
    _guard("fn-not-layer-output", "a functional batch norm not on a layer output is planned", FUNCTIONAL,
           "    if prod is None or producer_rule(prod.module)[0] is None:", "    if False:"),
    _guard("fn-linear-3d", "a functional batch norm on a Linear's 3-D output folds on its features", FUNCTIONAL,
           '    if producer_rule(prod.module)[0].kind == "linear" and len(call.input.shape) != 2:', "    if False:"),
    _guard("fn-read-elsewhere", "a functional batch norm on a layer output read elsewhere folds", FUNCTIONAL,
           "    if others or len(rec.reads.get(id(call.input), [])) != 1:", "    if False:", FUNCTIONAL_NAMED),
    _guard("fn-returned", "a functional batch norm on a layer output also returned folds", FUNCTIONAL,
           "    if id(call.input) in escapes:", "    if False:"),
    _guard("fn-called-twice", "a functional batch norm folds into a conv called twice", FUNCTIONAL,
           "    if len(rec.calls.get(id(prod.module), [])) != 1:", "    if False:"),
    _guard("fn-layer-problem", "a functional batch norm folds into a conv with a pre-hook", FUNCTIONAL,
           "    problem = producer_problem(prod.module, rec)\n", "    problem = None\n"),
    _guard("fn-block-hooks", "a functional batch norm's block with hooks is rewritten, its hooks dropped", FUNCTIONAL,
           "        return hooks(call.caller.module, call.caller.name, rec)", "        return None"),
    _guard("fn-untraceable", "a functional batch norm in a forward fx cannot trace is planned", FUNCTIONAL,
           '        return f"the forward of {where} cannot be traced by torch.fx ({type(exc).__name__})"',
           "        return None"),
    # merge
    _guard("merge-input-changed", "branches whose input is changed in place merge", MERGE,
           "    if any(writes_in_place(u, block) for u in x.users if u not in nodes):", "    if False:", MUST_NOT_MERGE),
    _guard("merge-not-same-input", "branches on different tensors merge", MERGE,
           "    if len(linear) < len(nodes):", "    if False:",
           "tests/test_merge.py::test_a_flat_branch_with_a_relu_inside_stays_with_its_reason"),
    _guard("merge-read-elsewhere", "a branch whose output is read elsewhere too merges", MERGE,
           '        if len(n.users) > 1:\n            return [], [], f"the output of',
           '        if False:\n            return [], [], f"the output of', MUST_NOT_MERGE),
    _guard("merge-geometry", "branches of other strides (dilation, groups, channels) merge", MERGE,
           "            if getattr(c, attr) != getattr(main, attr):", "            if False:", MUST_NOT_MERGE),
    _guard("merge-padding-mode", "a branch padding other than with zeros merges", MERGE,
           '        if isinstance(c.padding, str) or isinstance(main.padding, str) or c.padding_mode != "zeros":',
           "        if isinstance(c.padding, str) or isinstance(main.padding, str):", MUST_NOT_MERGE),
    _guard("merge-misaligned", "a branch whose kernel centre does not align merges", MERGE,
           "        if centre_padding(main.padding, main.dilation, main.kernel_size, c.kernel_size) != tuple(c.padding):",
           "        if False:", MUST_NOT_MERGE),
    _guard("merge-linear-3d", "Linear and BatchNorm branches on (N, C, L) merge", MERGE,
           '    if rule_kind(convs[main_i][1]) == "linear" and len(shape) != 2:', "    if False:"),
    _guard("merge-factor-axis", "a branch scaled on another axis merges", MERGE,
           "            if t.numel() != 1 and (per_channel_axis(t, len(shape)) != 1 or t.numel() != shape[1]):",
           "            if False:", "tests/test_weighted_sums.py::test_a_scale_on_the_wrong_axis_stays_with_its_reason"),
    _guard("merge-called-twice", "a branch called twice merges", BRANCHES,
           '    if call is None:\n        return None, None, f"{name} is called more than once"',
           '    if False:\n        return None, None, f"{name} is called more than once"', MUST_NOT_MERGE),
    _guard("merge-tied", "a branch conv with tied weights merges", BRANCHES,
           "        if holders:  # a merged conv", "        if False:  # a merged conv"),
    _guard("merge-layer-problem", "a branch conv with hooks merges", BRANCHES,
           "        why = producer_problem(module, rec)  # its hooks", "        why = None  # its hooks"),
    _guard("merge-norm-problem", "a BatchNorm branch with hooks merges", BRANCHES,
           "        why = _identity_norm(module) or norm_problem(module, rec) or (", "        why = _identity_norm(module) or ("),
    _guard("merge-norm-training", "a BatchNorm branch in training mode merges", BRANCHES,
           '            "it runs in training mode (batch statistics)" if call.training else None)', "            None)"),
    _guard("merge-branch-hooks", "a branch module with hooks is merged away, its hooks dropped", BRANCHES,
           "    why = hooks(module, name, rec)\n    if why:  # a branch module", "    why = None\n    if why:  # a branch module"),
    _guard("merge-does-more", "a branch module doing more than its conv and BatchNorm merges", BRANCHES,
           "    if call.output is not out:", "    if False:", MUST_NOT_MERGE),
    _guard("merge-read-first", "a branch changed in place after its BatchNorm merges", BRANCHES,
           "    if not reads or reads[0][1] not in _LINEAR_READS:\n"
           '        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"\n'
           '        return None, None, f"the output of {name}',
           "    if not reads:\n"
           '        ops = ", ".join(op for _, op in reads or []) or "nothing bnfuse saw"\n'
           '        return None, None, f"the output of {name}', MUST_NOT_MERGE),
    # scale
    _guard("scale-layer-called-twice", "a scale folds into a layer called twice", SCALE,
           '    if len(calls) != 1:\n        return f"{pname} is called', '    if False:\n        return f"{pname} is called'),
    _guard("scale-layer-problem", "a scale folds into a layer with hooks", SCALE,
           "    why = producer_problem(layer, rec)\n    if why:\n        return why\n",
           "    why = None\n    if why:\n        return why\n"),
    _guard("scale-layer-returned", "a scale folds into a layer whose output is returned", SCALE,
           '    if out is not None and id(out) in escapes:\n        return f"the output of {pname}',
           '    if False:\n        return f"the output of {pname}'),
    _guard("scale-read-elsewhere", "a scale folds into a layer whose output is read elsewhere", SCALE,
           "    if len(reads) != 1 or reads[0][0] is not call:", "    if False:", MUST_STAY),
    _guard("scale-axis", "a scale of the tokens folds into a Linear's features", SCALE,
           "    if feature_axis(pcall.module, rank) != axis:", "    if False:"),
    _guard("scale-hooks", "a scale module with hooks is replaced, its hooks dropped", SCALE,
           "        why = hooks(module, mname, rec)\n        if why:  # it would become",
           "        why = None\n        if why:  # it would become"),
    _guard("scale-fwd-returned", "a scale whose output is also returned folds forward", SCALE,
           '    if id(call.output) in escapes:\n        return None, f"its output is also',
           '    if False:\n        return None, f"its output is also'),
    _guard("scale-fwd-called-elsewhere", "a scale folds forward into a Linear called elsewhere", SCALE,
           "    if not through and layer_call.input is not call.output or len(rec.calls.get(id(layer), [])) != 1:",
           "    if not through and layer_call.input is not call.output:"),
    _guard("scale-fwd-layer-problem", "a scale folds forward into a Linear with tied weights", SCALE,
           "    why = producer_problem(layer, rec)\n    if why:\n        return None, why, ()",
           "    why = None\n    if why:\n        return None, why, ()"),
    _guard("scale-fwd-zero-pad", "a scale with a shift folds forward into a zero-padded conv", SCALE,
           '    if rule.kind != "linear" and (rule.transposed or pads and bool(found[1].any())):', "    if False:",
           MUST_STAY),
    _guard("scale-op-block-hooks", "a block with hooks has its multiplication folded, its hooks dropped", SCALE,
           "            if item is not None and hooked:", "            if False:"),
    _guard("scale-op-path-read", "a multiplication folds through a permuted output read elsewhere too", SCALE,
           '        if len(node.users) != 1:\n            return None, [], "a tensor on the way',
           '        if False:\n            return None, [], "a tensor on the way'),
    _guard("scale-op-layer-read", "a multiplication folds into a layer whose output is read elsewhere", SCALE,
           "    if why is None and len(rec.reads.get(id(pcall.output), [])) != 1:", "    if False:"),
    _guard("scale-op-not-per-channel", "a multiplication by one value per token and channel is planned", SCALE,
           "    if t.numel() != 1 and at is None:", "    if False:"),
    _guard("scale-op-axis", "a multiplication on another axis folds into a layer's features", SCALE,
           "    if axis is not None and axis != feat:", "    if False:", MUST_STAY),
    # horizontal
    _guard("horiz-activation-params", "sibling activations are alike by type alone (LeakyReLU 0.1 and 0.5)",
           HORIZONTAL, '        return ("module", type(m), tuple(sorted((k, repr(v)) for k, v in vars(m).items()\n'
           '                                                if not k.startswith("_") and k not in ("training", '
           '"inplace"))), rest)', '        return ("module", type(m), rest)', ALIKE),
    _guard("horiz-activation-args", "sibling activation functions are alike by name alone (F.leaky_relu slopes)",
           HORIZONTAL, '        return ("function", node.target.__name__.rstrip("_"), rest)',
           '        return ("function", node.target.__name__.rstrip("_"))', ALIKE + "[FunctionalSiblings]"),
    _guard("horiz-activation-hooks", "sibling activations with hooks run once, the others' hooks dropped", HORIZONTAL,
           "next(m.parameters(), None) is not None or m._forward_hooks \\\n                or m._forward_pre_hooks or",
           "next(m.parameters(), None) is not None \\\n                or", ALIKE + "[SiblingsActHook]"),
    _guard("horiz-activation-read-elsewhere", "a sibling output read elsewhere too is read after the activation",
           HORIZONTAL, "        if len(users) != 1 or not users[0].args or users[0].args[0] is not c:",
           "        if not users[0].args or users[0].args[0] is not c:", ALIKE + "[SiblingsActRead]"),
    _guard("horiz-geometry", "a strided sibling joins the others", HORIZONTAL,
           "    return (type(layer), layer.in_channels, layer.kernel_size, layer.stride, layer.padding,",
           "    return (type(layer), layer.in_channels, layer.kernel_size, layer.padding,",
           "tests/test_horizontal.py::test_an_inception_blocks_sibling_convs_become_one_wider_conv"),
    _guard("horiz-called-once", "a layer called twice is taken for a sibling", HORIZONTAL,
           "            sig = _signature(layer) if len(calls) == 1 and calls[0].input is not None else None",
           "            sig = _signature(layer) if calls and calls[0].input is not None else None",
           NOT_SIBLINGS + "[SiblingsTwice]"),
    _guard("horiz-tied", "a layer with tied weights is taken for a sibling", HORIZONTAL,
           "            if sig is not None and len(rec.holders.get(id(layer.weight), [])) == 1:",
           "            if sig is not None:", NOT_SIBLINGS + "[SiblingsTied]"),
    _guard("horiz-layer-problem", "a sibling with hooks is made part of a wider layer", HORIZONTAL,
           "            problems = {n: why for n in names if (why := producer_problem(model.get_submodule(n), rec))}",
           "            problems = {}"),
    _guard("horiz-block-hooks", "a module traced through, with hooks, is rewritten, its hooks dropped", HORIZONTAL,
           "            why = None if rel in called else hooks(m, child_name(block_name, rel) if rel else block_name, rec)",
           "            why = None"),
    _guard("horiz-site-activations", "the horizontal site leaves the siblings' activations out", HORIZONTAL,
           '            acts = it.acts or ("",) * len(it.layers)', '            acts = ("",) * len(it.layers)',
           "tests/test_guards.py::test_activations_taken_as_alike_by_type_alone_fail_the_horizontal_site"),
    # clone
    _guard("clone-norm-problem", "a BatchNorm with hooks folds into a copy", CLONE,
           "            or norm_problem(norm, rec):", "            or False:"),
    _guard("clone-training", "a BatchNorm in training mode folds into a copy", CLONE,
           '    if rule is None or rule.replacement != "identity" or len(calls) != 1 or calls[0].training \\',
           '    if rule is None or rule.replacement != "identity" or len(calls) != 1 \\'),
    _guard("clone-changed-in-place", "a BatchNorm after an in-place change folds into a copy of the layer before it",
           CLONE, "    if prod is None or pblock != block or len(reads) < 2 or reads[0][0] is None or reads[0][0].module "
           "is not norm:", "    if prod is None or pblock != block or len(reads) < 2:"),
    _guard("clone-other-block", "a BatchNorm folds into a copy of a layer in another block", CLONE,
           "    if prod is None or pblock != block or len(reads) < 2", "    if prod is None or len(reads) < 2"),
    _guard("clone-linear-3d", "a BatchNorm1d on a Linear's 3-D output folds into a copy on its features", CLONE,
           '    if prod.kind == "linear" and len(calls[0].input.shape) != 2:\n        return None, 0',
           "    if False:\n        return None, 0"),
    _guard("clone-layer-problem", "a BatchNorm folds into a copy of a layer with hooks", CLONE,
           "    why = producer_problem(pcall.module, rec) or hooks(", "    why = hooks("),
    _guard("clone-block-hooks", "a block with hooks gets a copy, its hooks dropped", CLONE,
           "    why = producer_problem(pcall.module, rec) or hooks(model.get_submodule(block) if block else model, "
           "block, rec)", "    why = producer_problem(pcall.module, rec)"),
    # unwrap
    _guard("unwrap-hooks", "a wrapper with hooks is replaced by its child, its hooks dropped", UNWRAP,
           "            why = hooks(module, name) or (", "            why = (",
           *_g("unwrap-hooks", "unwrap-pre-hooks", "unwrap-backward-hooks")),
    _guard("unwrap-aliased", "a wrapper held under two names is replaced under one", UNWRAP,
           '"it is held under more than one name" if counts[id(module)] > 1 else',
           '"it is held under more than one name" if False else', UNWRAPPED),
    _guard("unwrap-called-without", "a wrapper whose child the model also calls alone is replaced", UNWRAP,
           "if _calls(child, rec) != _calls(module, rec)", "if False", UNWRAPPED),
    # the verdict and what it judges
    _guard("verdict-any-output", "the verdict passes when any one output check passes",
           "bnfuse_cli/checks/verdict.py", "all(c.ok for c in counted)", "any(c.ok for c in counted)",
           "tests/test_judge.py::test_verify_counts_the_data_in_its_verdict",
           "tests/test_judge.py::test_wrong_scores_ranked_alike_fail_the_verdict_before_post_processing"),
    _guard("verdict-outputs-ignored", "the verdict ignores the outputs", "bnfuse_cli/checks/verdict.py",
           "        return bool(counted) and all(c.ok for c in counted) and not self.failed_sites",
           "        return bool(counted) and not self.failed_sites",
           "tests/test_judge.py::test_a_wrong_layer_no_site_covers_fails_the_verdict_on_its_outputs"),
    _guard("verdict-sites-ignored", "the verdict ignores the sites", "bnfuse_cli/checks/verdict.py",
           "        return bool(counted) and all(c.ok for c in counted) and not self.failed_sites",
           "        return bool(counted) and all(c.ok for c in counted)",
           "tests/test_judge.py::test_a_wrong_fold_the_outputs_hide_fails_the_verdict_on_its_site"),
    _guard("verdict-post-processing-ignored", "the tensors feeding post-processing are compared but not counted",
           "bnfuse_cli/checks/outputs.py", "    outputs[label] = pre\n", "    pass\n",
           "tests/test_judge.py::test_wrong_scores_ranked_alike_fail_the_verdict_before_post_processing"),
    _guard("postproc-layer-weights", "the probe keeps the weights of a layer that reads selected values",
           "bnfuse_cli/checks/postproc.py", "        if name in _LAYER_OPS and args:", "        if False:",
           "tests/test_postproc.py::test_a_second_stage_on_selected_values_is_judged_on_its_inputs_not_its_weights"),
    # the judge's own reading of the data flow at a site (bnfuse_cli/checks/flow.py)
    _guard("flow-calls", "a site whose layer also ran without the rest of it passes", FLOW,
           "            if fewer and kept in seen:", "            if False:",
           WRONG_SITE + "[fold-called-elsewhere]", WRONG_SITE + "[fn-called-twice]"),
    _guard("flow-reads", "a site whose removed value something else read passes", FLOW,
           "            if (n := self.reads.get(name, 0)) > 0:", "            if False:",
           WRONG_SITE + "[fold-other-reader]", WRONG_SITE + "[layout-read-elsewhere]"),
    _guard("flow-returned", "a value the model returns is not counted as read", FLOW,
           "        handles = [model.register_forward_hook(run.returned)]", "        handles = []",
           WRONG_SITE + "[fold-fwd-returned]"),
    _guard("flow-in-place", "an update in place leaves the tensor counted as the value it replaced", FLOW,
           "                self.produced.pop(r, None)", "                pass",
           FLOW_PASSES),
    _guard("flow-shape-only", "reading a tensor's shape counts as reading its values", FLOW,
           "tensors_in(args[:1]) if name in SELF_ONLY else inputs", "inputs", FLOW_PASSES),
    _guard("flow-value-free", "a zeros_like counts as reading the values of its tensor", FLOW,
           "        self.read([] if name in VALUE_FREE else", "        self.read([] if False else", FLOW_PASSES),
    _guard("flow-copies", "a copy made for its path counts the original's other readers", FLOW,
           "        for name, _ in () if key in self.copies else need.once:",
           "        for name, _ in need.once:",
           "tests/test_site_flow.py::test_a_copy_for_its_path_keeps_the_originals_values"),
    _guard("flow-next-module", "reads by the site's next module count as other readers", FLOW,
           "                    c[2 if any(n in self.running for n in self.nexts[c[0]] if n) else 1] += 1",
           "                    c[1] += 1", FLOW_SHARED),
    _guard("flow-parallel", "a sum whose branches ran unequally often passes", FLOW,
           "        if len({self.calls[n] for n in need.parallel if n in self.hooked}) > 1:", "        if False:",
           WRONG_SITE + "[merge-branch-twice]"),
]

# a data-flow guard broken in its pass must fail its own site check, not only the end-to-end comparison
MUTANTS = [Mutant(m.name, m.what, m.path, m.pattern, m.replacement, (*m.tests, SITE.format(m.name)), m.needs_cuda,
                  site=True) if m.name in SITE_GUARDS else m for m in MUTANTS]


class Stop(Exception):
    """The script cannot do its job (exit 2)."""


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "out",
                                    "*.egg-info", "*.pyc")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTHONSAFEPATH", None)
    return env


def _check_imports_copy(copy: Path, mutant: "Mutant | None") -> None:
    """``bnfuse_cli`` (and the mutated module) must import from ``copy``, with the mutated text in it."""
    module = "bnfuse_cli" if mutant is None else mutant.path[:-3].replace("/", ".")
    code = f"import importlib, sys; m = importlib.import_module({module!r}); sys.stdout.write(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True)
    if proc.returncode != 0:
        raise Stop(f"cannot import {module} from the copy:\n{proc.stderr}")
    where = Path(proc.stdout).resolve()
    if copy.resolve() not in where.parents:
        raise Stop(f"{module} was imported from {where}, not from the copy in {copy}")
    if mutant is not None and mutant.replacement not in where.read_text():
        raise Stop(f"{where} does not hold the mutated line of {mutant.name}")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - the venv has torch
        return False
    return bool(torch.cuda.is_available())


def _pytest(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _summary(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1].strip("= ") if lines else output.strip().splitlines()[-1] if output.strip() else "(no output)"


def _failed(output: str) -> list[str]:
    """The failed tests, a parametrised test once with its failed cases: ``file::test[a, b]``."""
    cases: dict[str, list[str]] = {}
    for m in re.finditer(r"^FAILED ([^\s\[]+)(?:\[(\S+)\])?", output, re.M):
        cases.setdefault(m.group(1), [])
        if m.group(2):
            cases[m.group(1)].append(m.group(2))
    return [f"{t}[{', '.join(c)}]" if c else t for t, c in sorted(cases.items())]


def _apply(copy: Path, m: Mutant) -> str:
    """Apply ``m`` to the copy; returns the original text (to restore)."""
    path = copy / m.path
    text = path.read_text()
    n = text.count(m.pattern)
    if n != 1:
        raise Stop(f"mutant {m.name}: pattern {m.pattern!r} found {n} times in {m.path} (expected exactly once); "
                   "the code changed: update the mutant in scripts/mutants.py")
    path.write_text(text.replace(m.pattern, m.replacement))
    return text


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = parser.parse_args(argv)
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s): {', '.join(sorted(unknown))}; known: {', '.join(m.name for m in MUTANTS)}")
        return 2
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.what}\n    {m.path}: {m.pattern.strip()!r} -> {m.replacement.strip()!r}")
            for t in m.tests:
                print(f"    {t}{'  (needs CUDA)' if m.needs_cuda else ''}")
        return 0

    cuda = _cuda()
    try:
        with tempfile.TemporaryDirectory(prefix="bnfuse-mutants-") as tmp:
            copy = _copy_repo(Path(tmp) / "repo")
            _check_imports_copy(copy, None)
            # every pattern is checked before anything runs
            for m in chosen:
                (copy / m.path).write_text(_apply(copy, m))
            runnable = [m for m in chosen if cuda or not m.needs_cuda]
            baseline = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
            t0 = time.perf_counter()
            rc, out = _pytest(copy, baseline)
            print(f"unmutated copy: {_summary(out)} ({time.perf_counter() - t0:.0f} s)")
            if rc != 0:
                raise Stop(f"the named tests must pass on the unmutated code:\n{out[-4000:]}")
            survived = []
            for m in chosen:
                if m.needs_cuda and not cuda:
                    print(f"SKIPPED   {m.name}: {m.what}\n"
                          f"          needs CUDA: killed by {', '.join(m.tests)} on a GPU")
                    continue
                original = _apply(copy, m)
                try:
                    _check_imports_copy(copy, m)
                    t0 = time.perf_counter()
                    rc, out = _pytest(copy, m.tests)
                finally:
                    (copy / m.path).write_text(original)
                took = time.perf_counter() - t0
                if rc == 0:
                    survived.append(m.name)
                    print(f"SURVIVED  {m.name}: {m.what}\n          {_summary(out)} ({took:.0f} s)")
                elif rc == 1 and m.site and not re.search(rf"^FAILED {re.escape(SITE.format(m.name))}", out, re.M):
                    survived.append(m.name)
                    print(f"SURVIVED  {m.name}: {m.what}\n          its own site check passed; failed only: "
                          f"{'; '.join(_failed(out))} ({took:.0f} s)")
                elif rc == 1 and _failed(out):
                    print(f"killed    {m.name}: {m.what}\n          by {'; '.join(_failed(out))} ({took:.0f} s)"
                          + ("\n          at its own site check" if m.site else ""))
                else:
                    raise Stop(f"mutant {m.name}: pytest exited {rc} without a failing test:\n{out[-4000:]}")
    except Stop as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ran = sum(1 for m in chosen if cuda or not m.needs_cuda)
    print(f"{ran - len(survived)} of {ran} mutants killed" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
