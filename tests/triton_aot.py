"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

The specialisations are those the launchers in fastattn/triton_kernels/ produce: every dtype,
head-dim block, feature flag and autotune config (after the dtype pruning). ``cases()`` lists
them, ``compile_case()`` compiles one for ``GPUTarget("cuda", arch, 32)``. Integer arguments
are compiled generic: the GPU launcher's extra specialisations of a call's values (a stride
of 1 as a constant, 16-divisible pointers and sizes) are not enumerated. Run as a script
(``python -m tests.triton_aot '<JSON list of cases>'``, without TRITON_INTERPRET) it compiles
them in order and prints one JSON summary line per case.
"""

from __future__ import annotations

import itertools
import json
import sys

ARCHS = (80, 90)
# Shared memory one block may use (the opt-in maximum), bytes: sm_80 A100, sm_90 H100.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
HEAD_BLOCKS = (16, 32, 64, 128, 256)  # _head_block() of every served head dim (1..256)
# The attention flags: (mask kind, HAS_ALIBI, HAS_DROPOUT, HAS_SOFTCAP); mask kind is None,
# "bool" or "float" (an additive mask of q's dtype; only such a mask can take a gradient).
ALL_FLAGS = ("float", True, True, True)
NO_FLAGS = (None, False, False, False)
ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")
LSTM_LAYER_KERNELS = ("lstm_layer_fwd", "lstm_layer_bwd")
LSTM_BLOCKS = (16, 32)  # block_size() of every H and P whose weights stay on chip (1..32)
# Past 32 the layer kernels stream the weights (RESIDENT=False) in tiles of this (BLOCK_H,
# BLOCK_P), whatever H and P.
LSTM_STREAMED = (32, 32)
# The LSTM layer flags: (HAS_PROJ, HAS_BATCH_SIZES, REVERSE, HAS_ZONEOUT_C, HAS_ZONEOUT_H,
# LAYER_NORM).
LSTM_FLAG_NAMES = ("HAS_PROJ", "HAS_BATCH_SIZES", "REVERSE", "HAS_ZONEOUT_C", "HAS_ZONEOUT_H",
                   "LAYER_NORM")
LSTM_ALL_FLAGS = (True, True, True, True, True, True)
LSTM_NO_FLAGS = (False, False, False, False, False, False)
LSTM_ALL_BUT_LN = (True, True, True, True, True, False)
# Where the attention kernels find each sequence (issue 16): None (dense), "varlen" (cu_seqlens,
# every kernel) or "paged" (a KV cache's lengths and block table, the forward only). Packed
# sequences take no mask; a KV cache no mask and no dropout.
SEQUENCE_FLAGS = {"varlen": (None, True, True, True), "paged": (None, True, False, True)}


def _attention_configs(
    kernel: str, dtype: str, block_e: int, block_ev: int
) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick for these."""
    import triton

    from fastattn.triton_kernels import attention

    shapes = attention._FWD_SHAPES if kernel == "attention_fwd" else attention._BWD_SHAPES
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in shapes]
    kept = attention._prune_for_dtype(configs, {"Q": _FakeTensor(dtype)}, BLOCK_E=block_e,
                                      BLOCK_EV=block_ev)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


class _FakeTensor:
    """What _prune_for_dtype reads of Q: its torch dtype."""

    def __init__(self, dtype: str):
        import torch

        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def cases(full: bool) -> list[dict]:
    """The compile cases, as JSON-able dicts.

    full=True: per arch and dtype, each attention kernel in every autotune
    config x head block (E = Ev) with all flags and with none, and in the first config every
    flag combination (head dim 64) and every (E, Ev) pair (all flags); the delta kernel at
    every head block; the LSTM kernels in every dtype and tile size (the layer kernels in every
    on-chip (H, P) tile pair with all flags, and at H = P without projection with no and all
    other flags; streamed with no flags, all flags, and all but the projection). Every value of
    every dimension, and every config with every head block, but not the whole product (24
    flag sets x 25 (E, Ev) pairs x configs would be ~25 times more): the flags add code to one
    tile layout, the configs and head blocks choose that layout and the shared memory.
    full=False (CI, a few minutes of 2 cores): every kernel in every dtype class on both archs
    where the lowering differs: attention fwd/dkdv/dq in the first autotune config (the one
    FASTATTN_TRITON_AUTOTUNE=0 keeps) at head dim 64 with every flag on (float mask, ALiBi,
    dropout, softcap, dmask): fp32 (FMA dots) on sm_80 and sm_90, fp16 on sm_80 (mma.sync),
    bf16 on sm_90 (wgmma); the backward dK/dV kernel (the most shared memory) at head block
    256 in fp16 on sm_90 and in fp32 on sm_80 (its own 32 x 32 config); the delta kernel; the
    LSTM cell in fp32, fp64, bf16 and the layer forward and backward with every flag in fp32 on
    sm_80 (the smaller shared memory) at their largest tiles (H = P = 32) and bf16 on sm_90 at
    H 32, P 16, and streamed (H, P > 32) with every flag in fp32 on sm_80 and none in bf16 on
    sm_90; the paged KV-cache forward in bf16 on sm_90 and the packed
    dQ kernel in fp16 on sm_80, the split-KV combine and the KV-cache append kernels.
    full=True adds the packed and paged paths in every config x head block, and the combine and
    append kernels at every head block.
    """
    if full:
        return _full_cases()
    out = [dict(kernel=k, dtype=d, arch=a) for k in ("lstm_cell_fwd", "lstm_cell_bwd")
           for d, a in (("fp32", 90), ("fp64", 90), ("bf16", 80))]
    out += [_lstm_layer_case(k, d, a, h, p, f) for k in LSTM_LAYER_KERNELS
            for d, a, h, p, f in (("fp32", 80, 32, 32, LSTM_ALL_FLAGS),
                                  ("bf16", 90, 32, 16, LSTM_ALL_BUT_LN))]
    out += [_lstm_layer_case(k, d, a, *LSTM_STREAMED, f, resident=False)
            for k in LSTM_LAYER_KERNELS
            for d, a, f in (("fp32", 80, LSTM_ALL_FLAGS), ("bf16", 90, LSTM_NO_FLAGS))]
    out += [dict(kernel="attention_bwd_delta", dtype=d, arch=a, block_ev=e)
            for d, a, e in (("fp32", 80, 16), ("bf16", 90, 256))]
    for kernel in ATTENTION_KERNELS:
        for dtype, arch in (("fp32", 80), ("fp32", 90), ("fp16", 80), ("bf16", 90)):
            out.append(_attention_case(kernel, dtype, arch, None, 64, 64, ALL_FLAGS))
    out += [_attention_case("attention_bwd_dkdv", d, a, None, 256, 256, NO_FLAGS)
            for d, a in (("fp16", 90), ("fp32", 80))]
    # Packed and paged sequences (each attention compile costs ~20-60 s of CI): the paged
    # forward (indirect key rows, split-KV) on wgmma and the packed dQ kernel on mma.sync.
    out += [_attention_case(k, d, a, None, 64, 64, SEQUENCE_FLAGS[seq], seq)
            for k, d, a, seq in (("attention_fwd", "bf16", 90, "paged"),
                                 ("attention_bwd_dq", "fp16", 80, "varlen"))]
    out += [dict(kernel="attention_split_combine", dtype="fp16", arch=90, block_ev=128),
            dict(kernel="kv_cache_append", dtype="bf16", arch=80, block_ev=128, paged=True)]
    return out


def _full_cases() -> list[dict]:
    out = []
    every_flags = list(itertools.product((None, "bool", "float"), *[(False, True)] * 3))
    for arch in ARCHS:
        for dtype in ("fp32", "fp16", "bf16", "fp64"):
            out += [dict(kernel=k, dtype=dtype, arch=arch)
                    for k in ("lstm_cell_fwd", "lstm_cell_bwd")]
        for dtype in ("fp32", "fp16", "bf16"):
            for kernel in LSTM_LAYER_KERNELS:
                out += [_lstm_layer_case(kernel, dtype, arch, h, p, f)
                        for h in LSTM_BLOCKS for p in LSTM_BLOCKS
                        for f in (LSTM_ALL_FLAGS, LSTM_ALL_BUT_LN)]
                out += [_lstm_layer_case(kernel, dtype, arch, h, h, (False, *f[1:]))
                        for h in LSTM_BLOCKS
                        for f in (LSTM_NO_FLAGS, LSTM_ALL_FLAGS, LSTM_ALL_BUT_LN)]
                out += [_lstm_layer_case(kernel, dtype, arch, *LSTM_STREAMED, f, resident=False)
                        for f in (LSTM_NO_FLAGS, LSTM_ALL_FLAGS, LSTM_ALL_BUT_LN,
                                  (False, *LSTM_ALL_FLAGS[1:]))]
            out += [dict(kernel="attention_bwd_delta", dtype=dtype, arch=arch, block_ev=e)
                    for e in HEAD_BLOCKS]
            for kernel in ATTENTION_KERNELS:
                out += [_attention_case(kernel, dtype, arch, c, e, e, f) for e in HEAD_BLOCKS
                        for c in _attention_configs(kernel, dtype, e, e)
                        for f in (ALL_FLAGS, NO_FLAGS)]
                out += [_attention_case(kernel, dtype, arch, None, 64, 64, f)
                        for f in every_flags if f not in (ALL_FLAGS, NO_FLAGS)]
                out += [_attention_case(kernel, dtype, arch, None, e, ev, ALL_FLAGS)
                        for e in HEAD_BLOCKS for ev in HEAD_BLOCKS if e != ev]
                for seq in ("varlen", "paged") if kernel == "attention_fwd" else ("varlen",):
                    out += [_attention_case(kernel, dtype, arch, c, e, e, SEQUENCE_FLAGS[seq],
                                            seq)
                            for e in HEAD_BLOCKS for c in _attention_configs(kernel, dtype, e, e)]
            out += [dict(kernel="attention_split_combine", dtype=dtype, arch=arch, block_ev=e)
                    for e in HEAD_BLOCKS]
            out += [dict(kernel="kv_cache_append", dtype=dtype, arch=arch, block_ev=e, paged=p)
                    for e in HEAD_BLOCKS for p in (False, True)]
    return out


def _lstm_layer_case(kernel, dtype, arch, block_h, block_p, flags, resident=True) -> dict:
    return dict(kernel=kernel, dtype=dtype, arch=arch, block_h=block_h, block_p=block_p,
                lstm_flags=flags, resident=resident)


def _attention_case(kernel, dtype, arch, config, block_e, block_ev, flags, sequences=None):
    """One attention case; config None is the first autotune config of the dtype."""
    config = config or _attention_configs(kernel, dtype, block_e, block_ev)[0]
    case = dict(kernel=kernel, dtype=dtype, arch=arch, config=tuple(config), block_e=block_e,
                block_ev=block_ev, flags=flags)
    if sequences:
        case["sequences"] = sequences
    return case


def case_id(case: dict) -> str:
    parts = [case["kernel"], case["dtype"], f"sm{case['arch']}"]
    if "config" in case:
        parts.append("M{}-N{}-w{}-s{}".format(*case["config"]))
        parts.append(f"E{case['block_e']}-Ev{case['block_ev']}")
        mask, alibi, dropout, softcap = case["flags"]
        names = [f"{mask}mask"] if mask else []
        switches = (("alibi", alibi), ("dropout", dropout), ("softcap", softcap))
        names += [name for name, on in switches if on]
        parts.append("+".join(names) or "noflags")
    if "block_h" in case:
        parts.append(f"H{case['block_h']}")
    if "block_p" in case:
        parts.append(f"P{case['block_p']}")
        names = ("proj", "packed", "reverse", "zoneout_c", "zoneout_h", "layer_norm")
        parts.append("+".join(n for n, on in zip(names, case["lstm_flags"], strict=True) if on)
                     or "noflags")
        parts.append("resident" if case["resident"] else "streamed")
    if "block_ev" in case and "config" not in case:
        parts.append(f"Ev{case['block_ev']}")
    if case.get("sequences"):
        parts.append(case["sequences"])
    if case.get("paged"):
        parts.append("paged")
    return "-".join(parts)


def _signature(fn, pointer_types: dict[str, str], float_args: set[str], constexprs: dict):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        else:
            signature[name] = "fp32" if name in float_args else "i32"
    return signature


def _attention_kernel(case: dict):
    """(jit function, signature, constexprs, options) of one attention compile case."""
    from fastattn.triton_kernels import attention

    dtype = case["dtype"]
    mask, alibi, dropout, softcap = case["flags"]
    block_m, block_n, warps, stages = case["config"]
    fn = {
        "attention_fwd": attention._attention_fwd_kernel,
        "attention_bwd_dkdv": attention._attention_bwd_dkdv_kernel,
        "attention_bwd_dq": attention._attention_bwd_dq_kernel,
    }[case["kernel"]].fn  # the jit function under the autotuner
    sequences = case.get("sequences")
    constexprs = {
        "HAS_MASK": mask is not None, "MASK_IS_BOOL": mask == "bool", "HAS_ALIBI": alibi,
        "HAS_DROPOUT": dropout, "HAS_SOFTCAP": softcap, "MASK_GRAD": mask == "float",
        "VARLEN": sequences == "varlen", "KEY_LENS": sequences == "paged",
        "PAGED": sequences == "paged",
        "BLOCK_E": case["block_e"], "BLOCK_EV": case["block_ev"], "BF16_DOT_IN_FP32": False,
        "BLOCK_M": block_m, "BLOCK_N": block_n,
    }
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    pointers = {name: dtype for name in ("Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ")}
    pointers.update(Lse="fp32", Delta="fp32", dMask="fp32", Slopes="fp32", Seed="i64",
                    Mask="i1" if mask == "bool" else dtype, CuSeqlensQ="i32", CuSeqlensK="i32",
                    SeqlensK="i32", BlockTable="i32")
    signature = _signature(fn, pointers, {"scale", "softcap", "dropout_p"}, constexprs)
    return fn, signature, constexprs, {"num_warps": warps, "num_stages": stages}


def _delta_kernel(case: dict):
    from fastattn.triton_kernels import attention

    fn = attention._attention_bwd_delta_kernel
    constexprs = {"BLOCK_EV": case["block_ev"], "BLOCK_M": attention._DELTA_BLOCK_M}
    pointers = {"Out": case["dtype"], "dOut": case["dtype"], "Delta": "fp32"}
    return fn, _signature(fn, pointers, set(), constexprs), constexprs, {}


def _combine_kernel(case: dict):
    from fastattn.triton_kernels import attention

    fn = attention._attention_split_combine_kernel
    constexprs = {"BLOCK_EV": case["block_ev"], "BLOCK_M": attention._DELTA_BLOCK_M}
    pointers = {"PartOut": "fp32", "PartLse": "fp32", "Out": case["dtype"], "Lse": "fp32"}
    return fn, _signature(fn, pointers, set(), constexprs), constexprs, {}


def _append_kernel(case: dict):
    from fastattn.triton_kernels import attention_varlen

    fn = attention_varlen._kv_cache_append_kernel
    constexprs = {"PAGED": case["paged"], "BLOCK_L": attention_varlen._APPEND_BLOCK_L,
                  "BLOCK_E": case["block_ev"], "BLOCK_EV": case["block_ev"]}
    pointers = {name: case["dtype"] for name in ("KNew", "VNew", "KCache", "VCache")}
    pointers.update(CacheSeqlens="i32", BlockTable="i32")
    return fn, _signature(fn, pointers, set(), constexprs), constexprs, {}


def _lstm_kernel(case: dict):
    import triton.language as tl

    from fastattn.triton_kernels import lstm_cell, lstm_layer

    dtype = case["dtype"]
    pointers = {}
    if case["kernel"] in LSTM_LAYER_KERNELS:
        fn = {"lstm_layer_fwd": lstm_layer._lstm_layer_fwd_kernel,
              "lstm_layer_bwd": lstm_layer._lstm_layer_bwd_kernel}[case["kernel"]]
        constexprs = dict(zip(LSTM_FLAG_NAMES, case["lstm_flags"], strict=True))
        constexprs.update(RESIDENT=case["resident"], BLOCK_B=lstm_layer.BLOCK_B,
                          BLOCK_H=case["block_h"], BLOCK_P=case["block_p"])
        options = {"num_warps": lstm_layer.num_warps(case["block_h"], case["block_p"])}
        # The backward's results are float32 (rounded by the launcher), and so are the LN
        # step's saved rows and gates_all with LAYER_NORM; batch sizes int64.
        f32 = ["grad_gates_all_ptr", "grad_h0_ptr", "grad_c0_ptr", "grad_hy_all_ptr",
               "grad_hh_all_ptr", "grad_c_new_all_ptr", "hh_norm_all_ptr", "c_norm_all_ptr",
               "rstd_all_ptr"]
        if constexprs["LAYER_NORM"]:
            f32.append("gates_all_ptr")
        pointers = dict.fromkeys(f32, "fp32")
        pointers["batch_sizes_ptr"] = "i64"
    else:
        fn = {"lstm_cell_fwd": lstm_cell._lstm_cell_fwd_kernel,
              "lstm_cell_bwd": lstm_cell._lstm_cell_bwd_kernel}[case["kernel"]]
        compute = tl.float64 if dtype == "fp64" else tl.float32
        constexprs = {"COMPUTE_DTYPE": compute, "BLOCK": lstm_cell.BLOCK}
        options = {"num_warps": 4}
    pointers = {name: pointers.get(name, dtype) for name in fn.arg_names if name.endswith("_ptr")}
    return fn, _signature(fn, pointers, {"eps"}, constexprs), constexprs, options


def compile_case(case: dict) -> dict:
    """Compiles one case for its arch; returns what the tests check of the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if case["kernel"].startswith("attention_bwd_delta"):
        fn, signature, constexprs, options = _delta_kernel(case)
    elif case["kernel"] == "attention_split_combine":
        fn, signature, constexprs, options = _combine_kernel(case)
    elif case["kernel"] == "kv_cache_append":
        fn, signature, constexprs, options = _append_kernel(case)
    elif case["kernel"].startswith("attention"):
        fn, signature, constexprs, options = _attention_kernel(case)
    else:
        fn, signature, constexprs, options = _lstm_kernel(case)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", case["arch"], 32), options=options,
    )
    return {"local_memory": ".local" in compiled.asm["ptx"], "shared": compiled.metadata.shared}


def first_config(case: dict) -> tuple[int, int, int, int]:
    """The autotune config FASTATTN_TRITON_AUTOTUNE=0 keeps for this attention case."""
    configs = _attention_configs(case["kernel"], case["dtype"], case["block_e"], case["block_ev"])
    return tuple(configs[0])


if __name__ == "__main__":
    # A JSON list of cases: one summary line each, printed as soon as it is compiled.
    for one in json.loads(sys.argv[1]):
        print(json.dumps(compile_case(one)), flush=True)
