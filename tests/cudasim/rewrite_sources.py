"""Copies CUDA sources for a cudasim build, rewriting only what host C++ cannot compile:

  asm volatile("PTX" : "=r"(x), ... : "r"(y), ... : "memory");
    -> ::cudasim::ptx::exec(__FILE__, __LINE__, "PTX", {::cudasim::ptx::out("=r", x), ...},
                            {::cudasim::ptx::in("r", y), ...});
  kernel<<<grid, block, smem, stream>>>(args);
    -> ::cudasim::launch_kernel(kernel, ::cudasim::LaunchConfig(grid, block, smem, stream), args);

Everything else stays byte for byte: the kernel bodies and the PTX text that run on a GPU are
the ones tested. Each rewritten statement keeps its line count and every file starts with a
#line naming its source path, so reports (races, deadlocks, compile errors) point at csrc/.
Usage: rewrite_sources.py SRC_DIR DST_DIR (SRC_DIR: a copy of csrc/ or csrc/ itself)
"""

import os
import re
import sys


def skip_string(s, i):
    """s[i] is a quote; returns the index after the closing quote."""
    q = s[i]
    i += 1
    while s[i] != q:
        i += 2 if s[i] == "\\" else 1
    return i + 1


def code_chars(s, i=0):
    """(index, depth) of each character of s from i on that is outside string and character
    literals; depth is the bracket nesting there (an opening bracket counts itself, a closing
    one does not)."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c in "\"'":
            i = skip_string(s, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        yield i, depth
        i += 1


def match_paren(s, i):
    """s[i] == '('; returns the index of the matching ')'."""
    return next(j for j, depth in code_chars(s, i) if depth == 0)


def split_top(s, sep):
    """s split at each sep outside brackets and literals (inside asm( ), every top-level ':'
    separates)."""
    cuts = [j for j, depth in code_chars(s) if depth == 0 and s[j] == sep]
    bounds = [-1, *cuts, len(s)]
    return [s[a + 1 : b] for a, b in zip(bounds, bounds[1:])]


def operands(text, kind):
    out = []
    for op in split_top(text, ","):
        op = op.strip()
        if not op:
            continue
        m = re.match(r'("[^"]*")\s*\((.*)\)\s*$', op, re.S)
        if not m:
            raise SystemExit(f"cannot parse asm operand {op!r}")
        out.append(f"::cudasim::ptx::{kind}({m.group(1)}, {m.group(2)})")
    return "{" + ", ".join(out) + "}"


def keep_lines(original, replacement):
    """Newlines that make `replacement` span as many lines as `original` did."""
    return "\n" * max(0, original.count("\n") - replacement.count("\n"))


def rewrite_asm(s):
    pattern = re.compile(r"\basm\s+(?:volatile\s*)?\(|\basm\s*\(|__asm__\s+(?:__volatile__\s*)?\(")
    pos, result = 0, []
    while True:
        m = pattern.search(s, pos)
        if not m:
            break
        open_i = m.end() - 1
        close_i = match_paren(s, open_i)
        parts = split_top(s[open_i + 1 : close_i], ":")
        template = parts[0].strip()
        outs = operands(parts[1], "out") if len(parts) > 1 else "{}"
        ins = operands(parts[2], "in") if len(parts) > 2 else "{}"
        result.append(s[pos : m.start()])
        call = f"::cudasim::ptx::exec(__FILE__, __LINE__, {template}, {outs}, {ins})"
        result.append(call + keep_lines(s[m.start() : close_i + 1], call))
        pos = close_i + 1
    result.append(s[pos:])
    return "".join(result)


def rewrite_launches(s):
    pos, result = 0, []
    while True:
        i = s.find("<<<", pos)
        if i < 0:
            break
        # The kernel expression starts after the previous statement boundary.
        start = max(s.rfind(";", 0, i), s.rfind("{", 0, i), s.rfind("}", 0, i)) + 1
        while s[start] in " \t\n":
            start += 1
        kernel = s[start:i].strip()
        j = s.find(">>>", i)
        config = s[i + 3 : j]
        k = s.index("(", j)
        close = match_paren(s, k)
        args = s[k + 1 : close].strip()
        result.append(s[pos:start])
        call = f"::cudasim::launch_kernel({kernel}, ::cudasim::LaunchConfig({config})" + (
            f", {args})" if args else ")"
        )
        result.append(call + keep_lines(s[start : close + 1], call))
        pos = close + 1
    result.append(s[pos:])
    return "".join(result)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    for root, _, files in os.walk(src):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)
            target = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not name.endswith((".cuh", ".cu", ".h")):
                continue  # host-only sources (CPU kernels, torch glue) are not emulated
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = f'#line 1 "csrc/{rel}"\n' + rewrite_launches(rewrite_asm(text))
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)


if __name__ == "__main__":
    main()
