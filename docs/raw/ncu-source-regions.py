# Where a decode_mma kernel's time goes, by source region: Nsight Compute's per-instruction stall samples (a SASS
# source page exported as CSV) mapped to source lines through the line table of a local build of the same source
# (SASS identical; the script checks every opcode).
#   on the GPU: ncu -k regex:decode_mma_kernel --launch-skip 3 --launch-count 1 --section SourceCounters -o rep \
#                   python3 docs/raw/ncu-one-short.py 128x64
#               ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
#   here:       nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -cubin -o dm.cubin kernels/decode_mma.cu
#               python3 docs/raw/ncu-source-regions.py sass.csv dm.cubin kernels/decode_mma.cu KERNEL_TAG ITEMS
# KERNEL_TAG: a part of the mangled kernel name, e.g. decode_mma_kernelI13__nv_bfloat16Li8ELi1ELi8ELb0EE; ITEMS: the
# launch's (sequence, head) items, to print warp instructions per item. Regions are found from marker lines of the
# source (item_at, prologue, flush, the tile loop, the product ...). NVDISASM: path of nvdisasm (default on PATH); MAIN:
# the kernel source's file name in the line table (default decode_mma.cu).
import collections, csv, os, re, subprocess, sys

sass_csv, cubin, source, tag, items = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
txt = subprocess.run([os.environ.get("NVDISASM", "nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True,
                     check=True).stdout.splitlines()
start = next(i for i, l in enumerate(txt) if l.strip().startswith(".section") and tag in l)
off_line, off_op, cur = {}, {}, None
for l in txt[start + 1:]:
    if l.strip().startswith(".section"):
        break
    m = re.match(r'\s*//## File "(.*?)", line (\d+)', l)
    if m:
        cur = (os.path.basename(m.group(1)), int(m.group(2)))
        continue
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
    if m:
        off_line[int(m.group(1), 16)], off_op[int(m.group(1), 16)] = cur, m.group(2).split()[0]
rows = list(csv.reader(open(sass_csv)))
hdr, data = rows[1], rows[2:]
i_s, i_e = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
base = int(data[0][0], 16)
bad = sum(1 for r in data if r[1].split() and not r[1].split()[0].startswith("@")
          and r[1].split()[0] != off_op.get(int(r[0], 16) - base))
print(f"{len(data)} instructions, {bad} opcodes that differ from the local build")
src = open(source).read().splitlines()
main = os.environ.get("MAIN", "decode_mma.cu")  # the kernel source's name in the line table
def find(text):
    return next(i for i, l in enumerate(src, 1) if text in l)
marks = [("item_at", "auto item_at = [&]"), ("load_stage", "auto load_stage = [&]"), ("prologue", "auto prologue = [&]"),
         ("constants, gather", "---- per-thread constants of the key gathers"), ("columns", "auto columns = [&]"),
         ("flush", "auto flush = [&]"), ("l_share", "auto l_share = [&]"), ("scatter", "auto scatter_pairs = [&]"),
         ("item start", "for (int item = i_begin; item < i_end; ++item)"),
         ("tile loop", "for (int it = 0; it < ntile; ++it)"), ("direct P.V", "    if (direct) {"),
         ("last scatter, flush", "---- the last tile's scatter"), ("histogram x values", "---- histogram x value centroids")]
bounds = [(name, find(text)) for name, text in marks] + [("end", find("the bins and red are read before the next item") + 1)]
samples, executed = collections.Counter(), collections.Counter()
for r in data:
    ln = off_line.get(int(r[0], 16) - base)
    key = "other lines (helpers, headers)"
    if ln and ln[0] == main:
        for (name, lo), (_, hi) in zip(bounds[:-1], bounds[1:]):
            if lo <= ln[1] < hi:
                key = name
    samples[key] += int(r[i_s])
    executed[key] += int(r[i_e])
tot_s, tot_e = sum(samples.values()), sum(executed.values())
print(f"{tot_s} stall samples, {tot_e / items:.0f} warp instructions per item")
print(f"{'region':32s} {'samples':>8s} {'instr/item':>11s}")
for name in [b[0] for b in bounds[:-1]] + ["other lines (helpers, headers)"]:
    print(f"{name:32s} {100 * samples[name] / tot_s:7.1f}% {executed[name] / items:11.0f}")
