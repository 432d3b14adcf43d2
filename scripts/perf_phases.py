#!/usr/bin/env python3
"""CPU samples of a `cubeload bench` run, per phase and per kind of work.

    perf record -F 1999 -g -o perf.data target/release/cubeload-torch bench CUBE \
        --image-batches 0 --remote-threads 0
    python3 scripts/perf_phases.py perf.data [PHASE KIND]

The bench runs, in each round, a ceiling pass (scoped threads named after the binary), a loader epoch with
two reader threads, another ceiling pass, the ceiling with writes (each read also streaming its share of
the batches' bytes) and an epoch with one reader (threads named `cubeload-reader`); before the rounds,
ceiling passes that calibrate and warm, which are left out.
Threads are told apart by name and by being started together; each phase's samples are divided by its
number of passes, so that phases and runs compare per pass; then each pass's samples in the order run, and
of those the page faults. With PHASE (ceiling, writes, loader2, loader1) and KIND (zstd, transpose,
pagecache, fault, alloc, mem, crc, other), the symbols of that kind in that phase are listed.
"""

import collections
import subprocess
import sys

# The phases of a round, in the order of the report.
PHASES = ("ceiling", "writes", "loader2", "loader1")

# Threads with fewer samples are not a phase's workers (the bench's short-lived helpers).
MIN_SAMPLES = 50


def kind(symbol):
    """The kind of work a sampled symbol does."""
    if "transpose" in symbol or "interleave" in symbol:
        return "transpose"
    # zstd's assembly decoders have no symbols.
    if symbol.startswith(("ZSTD", "HUF", "FSE", "[unknown]")):
        return "zstd"
    if "crc32c" in symbol:
        return "crc"
    if symbol.startswith(("_copy_to_iter", "filemap", "xas_", "copy_page", "touch_atime", "generic_file")):
        return "pagecache"
    if "page_fault" in symbol or "clear_page" in symbol or "handle_mm" in symbol:
        return "fault"
    if "mi_" in symbol or "malloc" in symbol or "free" in symbol:
        return "alloc"
    if "memmove" in symbol or "memcpy" in symbol or "memset" in symbol:
        return "mem"
    return "other"


def samples(path):
    """(thread name, thread id, leaf symbol) of every sample."""
    script = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,tid,ip,sym"], capture_output=True, text=True, check=True
    ).stdout
    out, thread, leaf = [], None, False
    for line in script.split("\n"):
        if not line.strip():
            thread = None
            continue
        # A sample's first line names its thread; its call chain follows, one frame per tab-indented line.
        if not line.startswith("\t"):
            name, tid = line.split()[:2]
            thread, leaf = (name, int(tid)), True
        elif thread and leaf:
            leaf = False
            parts = line.split(None, 1)
            out.append((thread[0], thread[1], parts[1].strip() if len(parts) > 1 else "?"))
    return out


def phases(all_samples):
    """Phase of each worker thread, and the number of passes of each phase."""
    count = collections.Counter((name, tid) for name, tid, _ in all_samples)
    main = min(tid for _, tid in count)
    name_of = {tid: name for name, tid in count}
    workers = sorted(tid for (_, tid), n in count.items() if n > MIN_SAMPLES and tid != main)
    # Threads started together have consecutive ids.
    groups = []
    for tid in workers:
        if groups and name_of[groups[-1][-1]] == name_of[tid] and tid - groups[-1][-1] <= 2:
            groups[-1].append(tid)
        else:
            groups.append([tid])
    # A ceiling pass runs two threads (the bench's default); passes one after the other may have consecutive
    # ids: split them. The passes before the first loader epoch but the last (the calibration on the first
    # batches, the warming read) are not a round's.
    split = []
    for group in groups:
        if name_of[group[0]] == "cubeload-reader":
            split.append(group)
        else:
            split.extend(group[k : k + 2] for k in range(0, len(group), 2))
    first_loader = next((i for i, g in enumerate(split) if name_of[g[0]] == "cubeload-reader"), len(split))
    split = split[max(first_loader - 1, 0) :]
    phase_of, passes, pass_of = {}, collections.Counter(), {}
    # After the two-reader epoch, a round runs the ceiling again, then the ceiling with writes.
    after_loader2 = None
    for group in split:
        if name_of[group[0]] != "cubeload-reader":
            phase = "writes" if after_loader2 == 1 else "ceiling"
            after_loader2 = None if after_loader2 is None else after_loader2 + 1
        else:
            phase = "loader2" if len(group) == 2 else "loader1"
            after_loader2 = 0 if phase == "loader2" else None
        for tid in group:
            phase_of[tid] = phase
            pass_of[tid] = passes[phase]
        passes[phase] += 1
    return phase_of, passes, pass_of


def main():
    all_samples = samples(sys.argv[1])
    phase_of, passes, pass_of = phases(all_samples)
    totals = collections.defaultdict(collections.Counter)
    # Samples of each pass in the order run, and of those the page faults: the first loader epoch of a run
    # is the first to touch its batch buffers' memory.
    each, faults = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for _, tid, symbol in all_samples:
        if tid in phase_of:
            totals[phase_of[tid]][kind(symbol)] += 1
            each[phase_of[tid]][pass_of[tid]] += 1
            faults[phase_of[tid]][pass_of[tid]] += kind(symbol) == "fault"
    print("passes", dict(passes))
    for phase in PHASES:
        n = passes[phase] or 1
        per_pass = {k: v // n for k, v in totals[phase].most_common()}
        print(phase, sum(totals[phase].values()) // n, per_pass)
    for phase in PHASES:
        runs = range(passes[phase])
        print(phase, "each pass", [each[phase][k] for k in runs], "faults", [faults[phase][k] for k in runs])
    if len(sys.argv) > 3:
        phase, wanted = sys.argv[2], sys.argv[3]
        symbols = collections.Counter(
            symbol for _, tid, symbol in all_samples if phase_of.get(tid) == phase and kind(symbol) == wanted
        )
        for symbol, n in symbols.most_common(25):
            print(n, symbol[:100])


if __name__ == "__main__":
    main()
