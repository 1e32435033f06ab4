#!/usr/bin/env python3
"""Assertions on the SASS of csrc/cuda/kernels.cu (called by scripts/check_cuda_compile.sh).

    python scripts/check_sass.py kernels.cubin    (cuobjdump, nvdisasm and c++filt on PATH)

For every instantiation of multi_segment_kernel<Functor, U>:
  - vector loops: at least as many 128-bit global stores (STG.E.128) as 16-byte words the
    functor's vector loops write (flatten: the flat words; average: the param words; SGD: param
    and momentum-buffer words; the outer round: theta0, outer buffer, param, inner buffer), and as many 128-bit global loads as they read (NOTE: [Vector
    access] in kernels.cu): per vector step, times U + 1 when U > 1 (the unrolled loop of U
    steps and the single-step loop after it, NOTE: [Unroll]);
  - U is the functor's own count (unroll_for in kernels.cu, recomputed here) except for the
    benchmark-only instantiations of the fp32 kernels (NOTE: [Launch configuration] in
    multi_segment.h): no other functor may have them;
  - no generic LD/ST: every access names the global space;
  - same-dtype flatten is a bit copy: no conversion instructions;
  - registers: no stack frame (no spills), and the resident blocks of 256 threads per SM that
    the register count allows on sm_90 (64K registers, 256-register warp granularity, 2048
    threads) are at least 4 for the default instantiations, at least 2 for the benchmark-only
    ones; the table printed shows each kernel's registers and resident blocks.
Exits 1 with the failing kernels listed.
"""
from __future__ import annotations

import re
import subprocess
import sys

SIZES = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}
BLOCK = 256
MIN_BLOCKS_PER_SM = 4


def vec_width(t):  # kVecWidth in kernels.cu: 16 bytes, at least 4 elements
    return max(16 // SIZES[t], 4)


def words(t, ilp):
    return ilp * SIZES[t] // 16


WORD_BUDGET = 12  # kWordBudget in kernels.cu


def unroll_for(words_per_step):  # unroll_for in kernels.cu
    return 4 if words_per_step * 4 <= WORD_BUDGET else 2 if words_per_step * 2 <= WORD_BUDGET else 1


def blocks_per_sm(regs):
    per_warp = -(-regs * 32 // 256) * 256
    warps = 65536 // per_warp if per_warp else 64
    return min(warps // (BLOCK // 32), 2048 // BLOCK)


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def main(cubin):
    sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    res = subprocess.run(["cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                         check=True).stdout
    bodies, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            bodies[cur] = []
        elif cur:
            bodies[cur].append(line)
    usage = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", res):
        usage[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    names = demangle(list(bodies))
    failures, rows = [], []
    for mangled, body in bodies.items():
        name = names[mangled]
        text = "\n".join(body)
        ops = re.findall(r"\b((?:LDG|STG|LD|ST)\.E[.\w]*)", text)
        regs, stack = usage.get(mangled, (None, None))
        if regs is None:
            failures.append(f"{name}: no resource usage found")
            continue
        short = re.sub(r"prsgd::cuda::|\(anonymous namespace\)::|^void ", "", name)
        short = short.split("(")[0].replace("multi_segment_kernel", "msk")
        bps = blocks_per_sm(regs)
        rows.append((short, regs, stack, bps, ops.count("STG.E.128"), ops.count("LDG.E.128")))
        if stack:
            failures.append(f"{short}: {stack} bytes of stack (spills)")
        mu = re.search(r"Functor<[^<>]*>, (\d+)>", name)
        unroll = int(mu.group(1)) if mu else 1
        generic = sorted({o for o in ops if o.startswith(("LD.", "ST."))})
        if generic:
            failures.append(f"{short}: generic memory accesses {generic}")
        m = re.search(r"FlattenFunctor<([\w ]+), ([\w ]+)>", name)
        if m:
            src, dst = m.group(1).strip(), m.group(2).strip()
            ilp = max(vec_width(src), vec_width(dst))
            need_st, need_ld = words(dst, ilp), words(src, ilp)
            own = unroll_for(need_st + need_ld)
            tunable = src == dst == "float"
            if src == dst and re.search(r"\bF2F|\bF2FP|\bHADD2\.F32|\bPRMT\b.*0x7632", text):
                failures.append(f"{short}: same-dtype flatten converts (expected a bit copy)")
        elif "OuterFunctor<" in name:
            # The outer round: flat, theta0 and its buffer (flat dtype), then old param, grad and
            # inner buffer (param dtype) in; theta0, its buffer, param and inner buffer out; one
            # word of the narrower type per step (kILP of OuterFunctor, no floor of 4).
            m = re.search(r"OuterFunctor<([\w ]+), ([\w ]+), (true|false)>", name)
            flat, param, div = m.group(1).strip(), m.group(2).strip(), m.group(3) == "true"
            ilp = 16 // min(SIZES[flat], SIZES[param])
            need_st = words(flat, ilp) * 2 + words(param, ilp) * 2
            need_ld = words(flat, ilp) * 3 + words(param, ilp) * (2 + div)
            own = unroll_for(words(flat, ilp) * 5 + words(param, ilp) * (4 + div))
            tunable = False
        else:
            m = re.search(r"AverageFunctor<([\w ]+), ([\w ]+), (true|false), (true|false), "
                          r"(true|false)>", name)
            if not m:
                if bps < MIN_BLOCKS_PER_SM:
                    failures.append(f"{short}: {regs} registers leave {bps} blocks per SM")
                continue  # add_block_sums_kernel: one block, no vector loop
            flat, param, sgd = m.group(1).strip(), m.group(2).strip(), m.group(3) == "true"
            div, acc = m.group(4) == "true", m.group(5) == "true"
            read = div or acc  # the old param, read once (NOTE: [Accumulate] in csrc/common.h)
            ilp = max(vec_width(flat), vec_width(param))
            need_st = words(param, ilp) * (2 if sgd else 1)
            need_ld = words(flat, ilp) + words(param, ilp) * ((2 if sgd else 0) + (1 if read else 0))
            own = unroll_for(words(flat, ilp) + words(param, ilp) * (1 + read + 3 * sgd))
            tunable = flat == param == "float" and not acc
        default = unroll == own
        if not default and not tunable:
            failures.append(f"{short}: unroll {unroll}, but this kernel's own count is {own} and "
                            "only the fp32 kernels have benchmark-only counts")
        min_blocks = MIN_BLOCKS_PER_SM if default else 2
        if bps < min_blocks:
            failures.append(f"{short}: {regs} registers leave {bps} blocks of {BLOCK} per SM")
        if unroll > 1:
            need_st, need_ld = need_st * (unroll + 1), need_ld * (unroll + 1)
        if ops.count("STG.E.128") < need_st:
            failures.append(f"{short}: {ops.count('STG.E.128')} STG.E.128, the vector loop stores "
                            f"{need_st} words")
        if ops.count("LDG.E.128") < need_ld:
            failures.append(f"{short}: {ops.count('LDG.E.128')} LDG.E.128, the vector loop loads "
                            f"{need_ld} words")
    print(f"{'kernel':<60} {'regs':>4} {'stack':>5} {'blocks/SM':>9} {'STG.128':>7} {'LDG.128':>7}")
    for r in sorted(rows):
        print(f"{r[0]:<60} {r[1]:>4} {r[2]:>5} {r[3]:>9} {r[4]:>7} {r[5]:>7}")
    print(f"check_sass: {len(rows)} kernels; {sum(1 for r in rows if r[3] < 8)} take fewer than "
          f"8 blocks of {BLOCK} per SM")
    if len(rows) < 40:
        failures.append(f"only {len(rows)} kernels found in {cubin}")
    if failures:
        print("check_sass: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("check_sass: OK (128-bit global stores/loads in every vector loop, no generic "
          "accesses, no spills)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
