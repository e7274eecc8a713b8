"""Mutation check of the cudasim suite: hand-written kernel bugs that the suite must catch.

Each mutation replaces one exact snippet of a csrc/ CUDA source (the snippet must occur
exactly once, so a mutation that no longer applies fails loudly instead of passing). For each
mutant the sources are copied, mutated and built (attention: the two-config subset build;
LSTM: the full LSTM program), then run under the lockstep and both skewed schedules until
one fails. A mutant is killed when a run fails (wrong values, a race / deadlock /
divergence report, a crash, or a hang past the timeout).

Run through scripts/mutation_check.sh [NAME_SUBSTRING ...]; it prints one line per mutant
and the kill count, and exits non-zero below the 90% target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import build as cudasim_build

SCHEDULES = ("rr", "greedy", "greedy-rev")
RUN_TIMEOUT_S = 300
TARGET = 0.9

FWD = "attention/attention_fwd.cuh"
BWD = "attention/attention_bwd.cuh"
COMMON = "attention/attention_common.cuh"
APPEND = "attention/kv_cache_append.cu"
SEQ = "lstm/lstm_sequence.cuh"
CELL = "lstm/lstm_cell.cuh"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str = ""  # empty: the mutant deletes the snippet

    @property
    def program(self) -> str:
        return "lstm" if self.file.startswith("lstm/") else "attention"


MUTATIONS = [
    # Forward (main kernel) and the pieces it shares with the backward.
    Mutation(
        "fwd-no-barrier-k-landed",
        FWD,
        "    __syncthreads();  // K tile landed; every warp is done with the previous V tile\n",
    ),
    Mutation(
        "fwd-no-barrier-v-landed",
        FWD,
        "    __syncthreads();  // V tile landed; every warp is done with the K tile\n",
    ),
    # The wait for the K (V) tile's cp.async copies removed, its barrier kept.
    *(
        Mutation(
            f"fwd-no-cp-async-wait-{tile.lower()}",
            FWD,
            f"    cp_async_wait_all();\n{barrier}",
            barrier,
        )
        for tile, barrier in ((t, f"    __syncthreads();  // {t} tile landed") for t in "KV")
    ),
    Mutation("fwd-out-not-rescaled", FWD, "        out_acc[n][2 * r] *= rescale;\n"),
    Mutation("fwd-row-sum-not-rescaled", FWD, "      row_sum[r] *= rescale;\n"),
    Mutation(
        "fwd-dropout-not-applied",
        FWD,
        "scores[n][e] *= dropout_factor(p, row_base, j);",
        "scores[n][e] *= 1.0f / (1.0f - p.dropout_p);",
    ),
    Mutation(
        "fwd-lse-without-max",
        FWD,
        ": row_max[r] + logf(sum);",
        ": logf(sum);",
    ),
    Mutation(
        "common-a-fragment-row",
        COMMON,
        "tile.at(row0 + (lane % 16), col0 + (lane / 16) * 8)",
        "tile.at(row0 + (lane % 8), col0 + (lane / 16) * 8)",
    ),
    Mutation(
        "common-pv-ldmatrix-without-trans",
        COMMON,
        "  ldmatrix_x4_trans(r, tile.at(k0",
        "  ldmatrix_x4(r, tile.at(k0",
    ),
    Mutation(
        "common-quad-max-one-step",
        COMMON,
        "  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));",
        "  return x;",
    ),
    Mutation(
        "common-window-right-exclusive",
        COMMON,
        "(window_right < 0 || d <= window_right);",
        "(window_right < 0 || d < window_right);",
    ),
    Mutation(
        "common-alibi-sign",
        COMMON,
        "slope * static_cast<float>(j - i - offset)",
        "slope * static_cast<float>(i - j + offset)",
    ),
    Mutation(
        "common-mask-row-stride",
        COMMON,
        "i * mask_row_stride + j * mask_col_stride",
        "i * mask_col_stride + j * mask_col_stride",
    ),
    Mutation(
        "common-float32-mask-rounded-to-element",
        COMMON,
        "if (mask_is_float32) return reinterpret_cast<const float*>(mask)[index];",
        "if (mask_is_float32) return ElementTraits<Element>::to_float(\n"
        "        ElementTraits<Element>::from_float(reinterpret_cast<const float*>(mask)[index]));",
    ),
    # Split-KV decode and the combine kernel.
    Mutation(
        "decode-overlapping-splits",
        FWD,
        "const int n_end = min(n_last, n_begin + per_split);",
        "const int n_end = min(n_last, n_begin + per_split + 1);",
    ),
    Mutation(
        "combine-unweighted-sum", FWD, "      weight_sum += weight;", "      weight_sum += 1.0f;"
    ),
    Mutation(
        "combine-lse-without-sum",
        FWD,
        ": lse_max + logf(weight_sum);",
        ": lse_max;",
    ),
    # Backward: preprocess, dQ, dK/dV.
    Mutation(
        "dq-no-barrier-after-kv",
        BWD,
        "    __syncthreads();  // every warp is done with the K and V tiles\n",
    ),
    Mutation(
        "dkdv-no-barrier-before-q",
        BWD,
        "      __syncthreads();  // every warp is done with the previous Q, dO, lse and delta\n",
    ),
    Mutation("dkdv-no-barrier-do-landed", BWD, "      __syncthreads();  // dO landed\n"),
    Mutation("dkdv-cp-async-wait-too-few", BWD, "cp_async_wait<1>();", "cp_async_wait<2>();"),
    Mutation(
        "dkdv-dropout-keep-lost",
        BWD,
        "d_scores[n][e] * keep - delta_s[c]",
        "d_scores[n][e] - delta_s[c]",
    ),
    Mutation(
        "dkdv-lse-column", BWD, "exp2f((s - lse_s[c]) * kLog2e)", "exp2f((s - lse_s[0]) * kLog2e)"
    ),
    Mutation(
        "dq-fragment-row", BWD, "          const int r = e / 2;", "          const int r = e % 2;"
    ),
    Mutation(
        "bwd-empty-row-lse", BWD, "return value == -INFINITY ? INFINITY : value;", "return value;"
    ),
    Mutation(
        "dq-softcap-derivative",
        BWD,
        "          scores[n][e] = d_score * ds_dz;",
        "          scores[n][e] = d_score * mod.scale;",
    ),
    Mutation(
        "preprocess-short-reduction",
        BWD,
        "for (int offset = kWarpSize / 2; offset > 0; offset /= 2)",
        "for (int offset = kWarpSize / 4; offset > 0; offset /= 2)",
    ),
    # Varlen and KV cache (the Sequence / Rows views of attention_common.cuh, the append).
    Mutation(
        "varlen-k-start-ignored",
        COMMON,
        "q_start = p.cu_seqlens_q[b], k_start = p.cu_seqlens_k[b];",
        "q_start = p.cu_seqlens_q[b], k_start = 0;",
    ),
    Mutation(
        "varlen-bottom-right-of-the-batch",
        COMMON,
        "offset = p.bottom_right ? seq.kv_len - seq.q_len : 0;",
        "offset = p.bottom_right ? p.kv_len - p.q_len : 0;",
    ),
    Mutation(
        "varlen-lse-head-stride",
        COMMON,
        "int64_t{h} * p.total_q + q_start",
        "int64_t{h} * p.q_len + q_start",
    ),
    Mutation(
        "paged-block-table-ignored",
        COMMON,
        "const int64_t block = blocks[r / block_size];",
        "const int64_t block = r / block_size;",
    ),
    Mutation(
        "paged-block-id-unchecked",
        COMMON,
        "    if (block < 0 || block >= num_blocks) return nullptr;\n",
    ),
    Mutation(
        "paged-missing-keys-zero",
        COMMON,
        "missing == MissingRows::kNaN ? ElementTraits<Element>::kNaNPair : 0u;",
        "0u;",
    ),
    Mutation(
        "batch-idx-ignored",
        COMMON,
        "blocks = p.cache_batch_idx + b, block_size = static_cast<int>(p.kv_len);",
        "",
    ),
    Mutation(
        "kv-cache-new-rows-unseen",
        COMMON,
        "const int64_t keys = p.cache_seqlens[b] + p.kv_new_len;",
        "const int64_t keys = p.cache_seqlens[b];",
    ),
    Mutation(
        "append-at-position-zero",
        APPEND,
        "const int64_t pos = p.cache_seqlens[b] + t;",
        "const int64_t pos = t;",
    ),
    # LSTM cell and persistent sequence kernels.
    Mutation("seq-no-grid-sync", SEQ, "    grid.sync();"),
    Mutation(
        "seq-no-barrier-after-stage",
        SEQ,
        "      stage_tile(h_s, h_prev, b0, tile_rows, H);\n      __syncthreads();\n",
        "      stage_tile(h_s, h_prev, b0, tile_rows, H);\n",
    ),
    Mutation(
        "seq-no-barrier-after-product",
        SEQ,
        "      tile_product(w_s, h_s, H, 0, units, H, rec_s);\n      __syncthreads();\n",
        "      tile_product(w_s, h_s, H, 0, units, H, rec_s);\n",
    ),
    Mutation(
        "seq-short-reduction",
        SEQ,
        "for (int offset = 16; offset > 0; offset /= 2)",
        "for (int offset = 8; offset > 0; offset /= 2)",
    ),
    Mutation(
        "seq-c-prev-from-h",
        SEQ,
        "const A c_before = load_l2(c_prev + b * H + unit);",
        "const A c_before = load_l2(h_prev + b * H + unit);",
    ),
    # The persistent backward.
    Mutation("seq-bwd-no-grid-sync", SEQ, "    if (s >= 0) grid.sync();"),
    Mutation(
        "seq-bwd-no-barrier-after-stage",
        SEQ,
        "G);\n        __syncthreads();\n        tile_product",
        "G);\n        tile_product",
    ),
    Mutation(
        "seq-bwd-no-barrier-after-product",
        SEQ,
        "        tile_product(w_s, dg_s, G, H, units, H, rec_s);\n        __syncthreads();\n",
        "        tile_product(w_s, dg_s, G, H, units, H, rec_s);\n",
    ),
    Mutation(
        "seq-bwd-w-rows-not-columns",
        SEQ,
        "columns ? (gate * H + k) * H + unit :",
        "columns ? (gate * H + unit) * H + k :",
    ),
    Mutation(
        "seq-bwd-drops-carried-c", SEQ, "(recurrent ? *carried_c : A(0))", "A(0)"
    ),
    Mutation(
        "seq-bwd-drops-a-gate-share",
        SEQ,
        "(rec[0] + rec[units]) + (rec[2 * units] + rec[3 * units])",
        "(rec[0] + rec[units]) + rec[2 * units]",
    ),
    Mutation(
        "seq-bwd-staged-from-step-t",
        SEQ,
        "grad_gates_all + (t + dir) * B * G",
        "grad_gates_all + t * B * G",
    ),
    Mutation(
        "seq-fwd-reverse-reads-the-wrong-neighbour",
        SEQ,
        "h_all + (t - dir) * B * H;  // [B, H]",
        "h_all + (t - 1) * B * H;  // [B, H]",
    ),
    Mutation(
        "seq-bwd-ignores-reverse",
        SEQ,
        "  const int64_t dir = p.reverse ? -1 : 1;\n  for (int64_t s = T_len - 1",
        "  const int64_t dir = 1;\n  for (int64_t s = T_len - 1",
    ),
    Mutation(
        "seq-packed-fwd-every-row-steps",
        SEQ,
        "const int64_t stepping = p.batch_sizes == nullptr ? B : p.batch_sizes[t];",
        "const int64_t stepping = B;",
    ),
    Mutation(
        "seq-packed-bwd-every-row-steps",
        SEQ,
        "const int64_t stepping = s < 0 || !packed ? B : p.batch_sizes[t];",
        "const int64_t stepping = B;",
    ),
    Mutation("seq-packed-bwd-drops-carried-h", SEQ, "*carried_h = dh_total;", "*carried_h = A(0);"),
    Mutation(
        "seq-packed-bwd-keeps-carried-h",
        SEQ,
        "if (h_skips) *carried_h = dh_total * zh;",
        "if (zoneout_h != nullptr) *carried_h = dh_total * zh;",
    ),
    Mutation(
        "seq-zoneout-fwd-h-from-mixed-c",
        SEQ,
        "        A h = o * tanh_(c);  // from the cell's c, before zoneout mixes it\n"
        "        if (zoneout_c != nullptr) c += to_acc(zoneout_c[state]) * (c_before - c);\n",
        "        if (zoneout_c != nullptr) c += to_acc(zoneout_c[state]) * (c_before - c);\n"
        "        A h = o * tanh_(c);  // from the cell's c, before zoneout mixes it\n",
    ),
    Mutation(
        "seq-zoneout-bwd-c-share-dropped",
        SEQ,
        "*carried_c = dc * f + dc_total * zc;",
        "*carried_c = dc * f;",
    ),
    Mutation(
        "seq-zoneout-bwd-h-share-dropped",
        SEQ,
        "const A dh = dh_total * (A(1) - zh);",
        "const A dh = dh_total;",
    ),
    Mutation(
        "cell-bwd-forget-gradient",
        CELL,
        "const A gf = dc * c_prev[e] * f[e] * (A(1) - f[e]);",
        "const A gf = dc * c[e] * f[e] * (A(1) - f[e]);",
    ),
    Mutation(
        "cell-vector-offset",
        CELL,
        "col((linear % vecs_per_row) * VEC)",
        "col(linear % vecs_per_row)",
    ),
    # The LayerNorm stage of the step kernels (block reductions, the LN backward).
    Mutation(
        "ln-no-barrier-after-partials",
        CELL,
        "    if (lane == 0) scratch[n * 32 + warp] = v[n];\n  }\n  __syncthreads();\n",
        "    if (lane == 0) scratch[n * 32 + warp] = v[n];\n  }\n",
    ),
    Mutation(
        "ln-block-sum-first-warp-only",
        CELL,
        "for (int w = 0; w < warps; ++w)",
        "for (int w = 0; w < 1; ++w)",
    ),
    Mutation(
        "ln-bwd-hh-without-projection-term",
        CELL,
        "(dy - hh_mean_dy - hh_norm[k] * hh_mean_dy_y) * rstd[0]",
        "(dy - hh_mean_dy) * rstd[0]",
    ),
    Mutation(
        "ln-fwd-cell-rstd-of-hh",
        CELL,
        "const A cn = (c_norm[u] - c_mean) * c_rstd;",
        "const A cn = (c_norm[u] - c_mean) * hh_rstd;",
    ),
]


def apply(mutation: Mutation, csrc: Path, dst: Path) -> None:
    for d in cudasim_build.KERNEL_DIRS:
        shutil.copytree(csrc / d, dst / d, ignore=shutil.ignore_patterns("*.cpp"))
    path = dst / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(
            f"mutation {mutation.name}: snippet occurs {text.count(mutation.old)} times in "
            f"{mutation.file} (must be exactly once): update tests/cudasim/mutations.py"
        )
    path.write_text(text.replace(mutation.old, mutation.new))


def verdict(mutation: Mutation, csrc: Path) -> tuple[bool, str]:
    """(killed, how) for one mutant."""
    with tempfile.TemporaryDirectory(prefix="cudasim-mutant-") as tmp:
        mutant = Path(tmp) / "csrc"
        apply(mutation, csrc, mutant)
        variant = "subset" if mutation.program == "attention" else "check"
        try:
            out = cudasim_build.build(
                variant, csrc=mutant, out=Path(tmp) / "build", programs=[mutation.program]
            )
        except RuntimeError as e:
            return True, f"does not compile: {str(e).splitlines()[-1][:100]}"
        for schedule in SCHEDULES:
            try:
                result = subprocess.run(
                    [str(out / mutation.program)],
                    capture_output=True,
                    text=True,
                    timeout=RUN_TIMEOUT_S,
                    env={**os.environ, "CUDASIM_SCHED": schedule},
                )
            except subprocess.TimeoutExpired:
                return True, f"hangs under {schedule}"
            if result.returncode != 0:
                log = (result.stderr + result.stdout).splitlines()
                # The first report or failing case (warnings only explain, they do not fail).
                fatal = [x for x in log if ("cudasim:" in x and "warning" not in x) or "FAIL" in x]
                first = fatal[0] if fatal else (log[-1] if log else f"exit {result.returncode}")
                return True, f"{schedule}: {first.strip()[:110]}"
        return False, "all schedules pass"


def main(argv: list[str]) -> int:
    csrc = cudasim_build.ROOT / "csrc"
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    killed = 0
    for m in chosen:
        t0 = time.monotonic()
        dead, how = verdict(m, csrc)
        killed += dead
        seconds = time.monotonic() - t0
        status = "KILLED  " if dead else "SURVIVED"
        print(f"{status} {m.name:36s} {seconds:5.0f}s  {how}", flush=True)
    share = killed / len(chosen) if chosen else 0.0
    print(
        f"mutation check: {killed} of {len(chosen)} mutants killed "
        f"({100 * share:.0f}%, target {100 * TARGET:.0f}%)"
    )
    return 0 if share >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
