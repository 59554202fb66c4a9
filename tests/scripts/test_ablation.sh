#!/usr/bin/env bash
# scripts/ablation.py against a fake `pion` (no training): the fake `sweep` writes each grid
# run's run_config.json and a summary.json whose best val loss is a parabola in log2(lr) with
# its minimum at a chosen lr per optimizer. Checks: the lr stage extends the grid by factors of
# 2 while the best lr is at an edge (at most 2 more) and not when it is inside; the seeds stage
# runs seeds 2 and 3 at the best lr; the report ranks the settings; bad arguments exit 2;
# --archive keeps finished runs and restores them into a fresh OUT.
# Usage: tests/scripts/test_ablation.sh SOURCE_DIR (ctest: ScriptAblation).
source "$(dirname "$0")/lib.sh" "${1:-}"
py=/usr/bin/python3
[[ -x $py ]] || py=python3

cat >"$tmp/pion" <<'X'
#!/usr/bin/env python3
# A fake `pion sweep`: one run directory per grid point, finished at once.
import itertools, json, math, os, sys
args = sys.argv[1:]
if args == ["--help"]:  # what the driver asks to learn OpenBLAS's kernel set
    if os.environ.get("OPENBLAS_VERBOSE") == "2":
        print("Core: FakeCore", file=sys.stderr)  # where OpenBLAS writes it
    print("usage: pion")
    sys.exit(0)
assert args[0] == "sweep", args
out, grid, flags, i = None, [], {}, 1
while i < len(args):
    a = args[i]
    if a == "--out": out = args[i + 1]; i += 2
    elif a == "--grid":
        k, v = args[i + 1].split("=", 1); grid.append((k, v.split(","))); i += 2
    elif a == "--dry-run": i += 1
    elif a.startswith("--"): flags[a[2:]] = args[i + 1]; i += 2
    else: i += 1
best = {"adamw": 0.016, "muon": 0.02, "pion": 0.0025}  # where each optimizer's loss is least
for values in itertools.product(*[v for _, v in grid]):
    point = dict(zip([k for k, _ in grid], values))
    name = "_".join(f"{k}-{v}" for k, v in point.items())
    d = os.path.join(out, "runs", name)
    os.makedirs(d, exist_ok=True)
    config = {"max_iters": int(flags["max_iters"]), "d_model": int(flags.get("d_model", 128))}
    for k, v in point.items():
        config[k] = int(v) if k in ("seed", "d_model") else (float(v) if "lr" in k else v)
    opt = config["optimizer"]
    lr = config["lr" if opt == "adamw" else "matrix_lr"]
    loss = 1.5 + 0.01 * math.log2(lr / best[opt]) ** 2 + 0.001 * config["seed"]
    # WORSE=a,b: runs whose name holds a or b lose 0.1 (to rank settings as a test needs).
    loss += 0.1 * any(w and w in name for w in os.environ.get("WORSE", "").split(","))
    if os.environ.get("DIVERGE") and os.environ["DIVERGE"] in name:
        loss = 8.8e26  # a run that blew up, as one AdamW run without RMSNorm did
    json.dump(config, open(os.path.join(d, "run_config.json"), "w"))
    open(os.path.join(d, "log.txt"), "w").write("trained\n")  # as a real run leaves
    json.dump({"best_val_loss": loss, "iters": config["max_iters"],
               "optimizer_state_bytes_per_rank": [2 ** 20],
               "optimizer_step_cpu_ms_per_rank": [1.0]}, open(os.path.join(d, "summary.json"), "w"))
    with open(os.environ.get("CALLS", os.path.join(out, "calls.txt")), "a") as f:
        f.write(name + "\n")
X
chmod +x "$tmp/pion"

run() { "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/out" --iters 10 "$@" >"$tmp/log" 2>&1; }
run --stages lr,seeds,report
rc=$?
[[ $rc -eq 0 ]] && ok "lr,seeds,report ran" || fail "exit $rc: $(tail -n 20 "$tmp/log")"
calls=$tmp/out/calls.txt
# AdamW's minimum (0.016) lies beyond the grid's top (4e-3): 8e-3, then 0.016 (2 extensions).
grep -qx "optimizer-adamw_lr-0.008_seed-1" "$calls" && grep -qx "optimizer-adamw_lr-0.016_seed-1" "$calls" &&
  ok "AdamW grid extended twice upwards" || fail "AdamW runs: $(grep adamw "$calls" | tr '\n' ' ')"
grep -q "optimizer-adamw_lr-0.032" "$calls" && fail "AdamW extended a third time" || ok "at most 2 extensions"
# Muon's minimum (0.02) is inside its grid (0.01 ... 0.08): no extension.
[[ $(sort -u "$calls" | grep -c "optimizer-muon_matrix_lr-[0-9.e-]*_seed-1$") -eq 4 ]] &&
  ok "Muon not extended (best inside)" || fail "Muon runs: $(grep muon "$calls" | tr '\n' ' ')"
# Pion's minimum (0.0025) is inside its grid (0.001 ... 0.01): seeds 2 and 3 at 0.002 (the
# nearest grid value; the parabola in log2 puts 0.002 closer than 0.005).
grep -q "pion_momentum-lie_pion_update_side-both_pion_normalizer-adam_matrix_lr-0.002_seed-3" "$calls" &&
  ok "Pion seeds 2, 3 at its best lr" || fail "Pion seed runs: $(grep 'seed-3' "$calls" | grep pion | head -3)"
grep -qx "optimizer-adamw_lr-0.016_seed-2" "$calls" && ok "AdamW seeds at the extended best lr" ||
  fail "AdamW seed-2 runs: $(grep 'adamw.*seed-2' "$calls")"
grep -q "| Muon | 0.02 | 1.502" "$tmp/out/ABLATION.md" && ok "report: Muon at 0.02, mean of 3 seeds" ||
  fail "report: $(head -n 12 "$tmp/out/ABLATION.md")"

before=$(sort -u "$calls" | wc -l)
run --stages lr
[[ $(sort -u "$calls" | wc -l) -eq $before ]] && ok "a rerun asks for no new run" ||
  fail "a rerun added runs: $(sort -u "$calls" | wc -l) vs $before"

for bad in "--stages lr,bogus" "--jobs x"; do
  # shellcheck disable=SC2086
  run $bad
  rc=$?
  [[ $rc -eq 2 ]] && ok "'$bad' exits 2" || fail "'$bad' gave exit $rc"
done
"$py" "$src/scripts/ablation.py" --pion "$tmp/none" --out "$tmp/o" >"$tmp/log" 2>&1
rc=$?
[[ $rc -eq 2 ]] && grep -q "no pion binary" "$tmp/log" && ok "missing binary: exit 2 with a hint" ||
  fail "missing binary gave exit $rc: $(cat "$tmp/log")"

# --bench-json: the variant benchmark's step time and moment state beside each setting.
cat >"$tmp/bench.json" <<'X'
{"tool": "pion bench optim --pion_variants", "hardware": "test", "date": "today", "steps": 5,
 "rows": [{"optimizer": "adamw", "label": "AdamW", "median_ms": 32.1, "moment_bytes": 56623104},
          {"optimizer": "pion", "momentum": "lie", "update_side": "both", "normalizer": "adam",
           "median_ms": 2332.1, "ratio_to_default": 1.0, "moment_bytes": 152567808},
          {"optimizer": "pion", "momentum": "ambient", "update_side": "right", "normalizer": "adam",
           "median_ms": 788.1, "ratio_to_default": 0.338, "moment_bytes": 56623104}]}
X
run --stages report --bench-json "$tmp/bench.json"
rc=$?
[[ $rc -eq 0 ]] && grep -q "| Pion ambient/right/adam |.*| 788.1 (0.34x) | 54.00 |" "$tmp/out/ABLATION.md" &&
  grep -q "| AdamW |.*| 32.1 | 54.00 |" "$tmp/out/ABLATION.md" &&
  grep -q "| Muon |.*| — | — |" "$tmp/out/ABLATION.md" &&
  ok "report: the benchmark's step time and state beside each setting" ||
  fail "report with --bench-json (exit $rc): $(grep -E 'AdamW|Muon|ambient/right' "$tmp/out/ABLATION.md" | head -4)"
grep -q "^| Muon | .*\*\*0.02: 1.50" "$tmp/out/ABLATION.md" && ok "report: every lr, the best in bold" ||
  fail "report lr table: $(grep -A4 'Every lr' "$tmp/out/ABLATION.md")"
echo '{"rows": 3}' >"$tmp/bad.json"
for bad in "$tmp/bad.json" "$tmp/missing.json"; do
  run --stages report --bench-json "$bad"
  rc=$?
  [[ $rc -eq 2 ]] && grep -q "pion_variants --json" "$tmp/log" && ok "bad --bench-json: exit 2 with a hint" ||
    fail "--bench-json $bad gave exit $rc: $(cat "$tmp/log")"
done

# --archive: finished runs' two small files (and the machine that trained them) kept in DIR,
# and copied back into a fresh OUT.
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/out" --iters 10 --stages report \
  --archive "$tmp/archive" >"$tmp/log" 2>&1 || fail "archive: exit $?: $(tail -n 5 "$tmp/log")"
kept=$(find "$tmp/archive/runs" -name summary.json | wc -l)
stamped=$(grep -l '"openblas_core": "FakeCore"' "$tmp"/archive/runs/*/machine.json | wc -l)
[[ $kept -eq $(find "$tmp/out/runs" -name summary.json | wc -l) && $kept -gt 20 && $stamped -eq $kept ]] &&
  [[ -z $(find "$tmp/archive/runs" -type f ! -name run_config.json ! -name summary.json ! -name machine.json) ]] &&
  ok "archive: every finished run's config, summary and machine, nothing else ($kept runs)" ||
  fail "archive holds $kept runs, $stamped with a machine: $(find "$tmp/archive" -type f | head -5)"
# --stages archive: only the sync, e.g. for a run a driver finished inside its current sweep.
cp -r "$tmp/out/runs/optimizer-muon_matrix_lr-0.02_seed-1" "$tmp/out/runs/extra-run"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/out" --iters 10 --stages archive \
  --archive "$tmp/archive" >"$tmp/log" 2>&1
[[ -f $tmp/archive/runs/extra-run/summary.json ]] &&
  ok "--stages archive: a run finished since the last sync is kept" ||
  fail "--stages archive: $(ls "$tmp/archive/runs" | grep extra; tail -n 3 "$tmp/log")"
rm -r "$tmp/out/runs/extra-run" "$tmp/archive/runs/extra-run"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/fresh" --iters 10 --stages report \
  --archive "$tmp/archive" >"$tmp/log" 2>&1
grep -q "^Machines (archived runs): $kept on .* (OpenBLAS FakeCore)" "$tmp/fresh/ABLATION.md" &&
  ok "report: which machine made how many runs" || fail "report machines: $(grep Machines "$tmp/fresh/ABLATION.md")"
# A run restored from the archive was not trained here: a sync must not stamp this machine on it.
rm "$tmp/archive/runs/optimizer-muon_matrix_lr-0.02_seed-1/machine.json"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/fresh" --iters 10 --stages archive \
  --archive "$tmp/archive" >"$tmp/log" 2>&1
[[ ! -e $tmp/archive/runs/optimizer-muon_matrix_lr-0.02_seed-1/machine.json ]] &&
  ok "archive: a restored run gets no machine stamp" || fail "archive stamped a restored run"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/out" --iters 10 --stages archive \
  --archive "$tmp/archive" >"$tmp/log" 2>&1
cmp -s "$tmp/out/ABLATION.md" "$tmp/fresh/ABLATION.md" &&
  grep -q "| Muon | 0.02 | 1.502" "$tmp/fresh/ABLATION.md" &&
  ok "archive: a fresh OUT reports the archived runs as the first did" ||
  fail "fresh report differs: $(diff "$tmp/out/ABLATION.md" "$tmp/fresh/ABLATION.md" | head -n 8)"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/fresh" --iters 10 --stages seeds \
  --archive "$tmp/archive" --dry-run >"$tmp/log" 2>&1
grep -q -- "--grid seed=1,2,3" "$tmp/log" && ok "archive: the seeds stage finds the archived best lrs" ||
  fail "seeds after restore: $(tail -n 5 "$tmp/log")"

# --archive that is a file, or whose runs/ is a file: exit 2 naming the flag.
echo x >"$tmp/afile"
mkdir -p "$tmp/adir" && echo x >"$tmp/adir/runs"
for bad in "$tmp/afile" "$tmp/adir"; do
  run --stages report --archive "$bad"
  rc=$?
  [[ $rc -eq 2 ]] && grep -q -- "--archive $bad" "$tmp/log" && ok "bad --archive: exit 2 naming the flag" ||
    fail "--archive $bad gave exit $rc: $(tail -n 3 "$tmp/log")"
done

# --best-lrs: a given setting runs seed 1 at its given lr only, and its seeds there.
echo '{"AdamW": "1e-3"}' >"$tmp/best.json"
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/given" --iters 10 --stages lr,seeds,report \
  --best-lrs "$tmp/best.json" >"$tmp/log" 2>&1 || fail "--best-lrs: exit $?: $(tail -n 5 "$tmp/log")"
given=$(grep adamw "$tmp/given/calls.txt" | sort -u | tr '\n' ' ')
[[ $given == "optimizer-adamw_lr-1e-3_seed-1 optimizer-adamw_lr-1e-3_seed-2 optimizer-adamw_lr-1e-3_seed-3 " ]] &&
  grep -q "Given best lrs.*AdamW 1e-3" "$tmp/given/ABLATION.md" &&
  [[ $(sort -u "$tmp/given/calls.txt" | grep -c "optimizer-muon_matrix_lr-[0-9.e-]*_seed-1$") -eq 4 ]] &&
  ok "--best-lrs: AdamW at 1e-3 only, said in the report; Muon swept" || fail "--best-lrs runs: $given"
# ... and the report's row is at the given lr even where another lr's seed-1 run is better.
run --stages report --best-lrs "$tmp/best.json"
grep -q "^| AdamW | 1e-3 | " "$tmp/out/ABLATION.md" && ok "--best-lrs: the report's row at the given lr" ||
  fail "--best-lrs report row: $(grep '^| AdamW' "$tmp/out/ABLATION.md" | head -1)"
echo '{"Adam": "1e-3"}' >"$tmp/bad1.json"
echo '{"AdamW": "fast"}' >"$tmp/bad2.json"
echo '{"AdamW": {"lr": "1e-3"}}' >"$tmp/bad3.json"
echo '{"AdamW": "1e-' >"$tmp/bad4.json"
for bad in "$tmp/bad1.json" "$tmp/bad2.json" "$tmp/bad3.json" "$tmp/bad4.json" "$tmp/missing.json"; do
  run --stages report --best-lrs "$bad"
  rc=$?
  [[ $rc -eq 2 ]] && grep -q -- "--best-lrs $bad" "$tmp/log" && ok "bad --best-lrs: exit 2 naming the file" ||
    fail "--best-lrs $bad gave exit $rc: $(cat "$tmp/log")"
done

# ... and stage width runs the given setting's lr sweep at the base width, under its names.
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/given" --iters 10 --stages width \
  --best-lrs "$tmp/best.json" >"$tmp/log" 2>&1 || fail "--best-lrs width: exit $?: $(tail -n 5 "$tmp/log")"
grep -qx "optimizer-adamw_lr-5e-4_seed-1" "$tmp/given/calls.txt" &&
  grep -qx "optimizer-adamw_d_model-64_lr-5e-4_seed-1" "$tmp/given/calls.txt" &&
  ok "--best-lrs: stage width sweeps the given setting at the base width too" ||
  fail "--best-lrs width runs: $(grep 'adamw_lr-5e-4' "$tmp/given/calls.txt")"

# --shard K/N: two drivers at once on one OUT split every stage (width and nonorm too; nonorm
# polls until the other shard's seeds are done): no run asked for twice, none left out.
"$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/single" --iters 10 \
  --stages lr,seeds,width,nonorm >"$tmp/log" 2>&1 || fail "single driver: exit $?"
shard() {
  CALLS=$tmp/shard$1.txt PION_ABLATION_POLL_S=0.2 "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" \
    --out "$tmp/shared" --iters 10 --stages lr,seeds,width,nonorm --shard "$1/2" >"$tmp/shard$1.log" 2>&1
}
# Shard 0 alone reaches stage nonorm and must wait there; shard 1 starts only then.
shard 0 &
for _ in $(seq 1200); do grep -q "stage nonorm waits" "$tmp/shard0.log" && break; sleep 0.1; done
grep -q "stage nonorm waits" "$tmp/shard0.log" && ok "--shard: nonorm waits for the other shard's seeds" ||
  fail "--shard: shard 0 did not wait: $(grep -A2 'stage nonorm' "$tmp/shard0.log")"
shard 1
wait
both=$(cat <(sort -u "$tmp/shard0.txt") <(sort -u "$tmp/shard1.txt") | sort | uniq -d | wc -l)
union=$(cat "$tmp/shard0.txt" "$tmp/shard1.txt" | sort -u | wc -l)
single=$(sort -u "$tmp/single/calls.txt" | wc -l)
split() { grep -q -- "$1" "$tmp/shard0.txt" && grep -q -- "$1" "$tmp/shard1.txt"; }
[[ $both -eq 0 && $union -eq $single ]] && split d_model-256 && split norm-none &&
  ok "--shard: disjoint halves that together make the single driver's $single runs; width and nonorm split" ||
  fail "--shard: $both runs in both, $union in all (single $single): $(tail -n 3 "$tmp/shard0.log")"
for bad in x 0 -1; do
  PION_ABLATION_POLL_S=$bad run --stages report
  rc=$?
  [[ $rc -eq 2 ]] && grep -q "PION_ABLATION_POLL_S=$bad" "$tmp/log" && ok "PION_ABLATION_POLL_S=$bad exits 2 naming it" ||
    fail "PION_ABLATION_POLL_S=$bad gave exit $rc: $(tail -n 3 "$tmp/log")"
done
# Three shards of three chosen settings, and a fourth shard with none: it must run no
# no-norm run at all (an empty share once fell back to every setting).
for k in 0 1 2 3; do
  CALLS=$tmp/four$k.txt "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/shared" --iters 10 \
    --stages nonorm --shard "$k/4" >"$tmp/log" 2>&1 || fail "--shard $k/4: exit $?"
done
[[ ! -s $tmp/four3.txt ]] && ok "--shard 3/4 with no chosen setting of its own runs nothing" ||
  fail "--shard 3/4 ran: $(head -n 3 "$tmp/four3.txt")"
# Stage widthseeds: seeds 2 and 3 at each width's seed-1 best lr and the lrs beside it; the
# report gives mean ± std there and the best lr on 3 seeds. Pion's seed-1 best is 0.002 of
# 0.001, 0.002, 0.005, 0.01 at every width (the fake ignores d_model).
CALLS=$tmp/ws.txt "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/ws" --iters 10 \
  --stages lr,width,widthseeds,report >"$tmp/log" 2>&1 || fail "widthseeds: exit $?: $(tail -n 5 "$tmp/log")"
pw="optimizer-pion_d_model-64_init-spectral_pion_momentum-lie_pion_update_side-both_pion_normalizer-adam_matrix_lr"
got=$(grep -c "^${pw}-0.00[125]_seed-[23]$" "$tmp/ws.txt")
grep -q "^${pw}-0.01_seed-[23]" "$tmp/ws.txt" && got=wrong
[[ $got == 6 ]] && grep -q "0.002: 1.5... ± 0.0010 (3)" "$tmp/ws/ABLATION.md" &&
  grep -q "| Pion lie/both/adam | 64 | .* | 0.002 | 0.002 |" "$tmp/ws/ABLATION.md" &&
  grep -q "| Pion lie/both/adam | 64 | 256 | 0.002 | 1.5... | 1.5... | +0.0000 |" "$tmp/ws/ABLATION.md" &&
  ok "widthseeds: seeds 2, 3 at the best lr and its neighbours only; the report gives mean ± std, the 3-seed best and the cost of a transferred lr (0 where the fake ignores width)" ||
  fail "widthseeds: $got of 6 runs; $(grep '| 64 |' "$tmp/ws/ABLATION.md")"
# Two shards of widthseeds on a copy of that OUT without its seeds: disjoint, same runs.
for k in 0 1; do
  rm -rf "$tmp/ws$k"
  cp -r "$tmp/ws" "$tmp/ws$k"
  find "$tmp/ws$k/runs" -maxdepth 1 -name "*_seed-[23]" -exec rm -rf {} +
done
for k in 0 1; do
  CALLS=$tmp/wsh$k.txt "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/ws$k" --iters 10 \
    --stages widthseeds --shard "$k/2" >"$tmp/log" 2>&1 || fail "widthseeds --shard $k/2: exit $?"
done
both=$(sort "$tmp/wsh0.txt" "$tmp/wsh1.txt" | uniq -d | wc -l)
[[ $both -eq 0 && $(sort -u "$tmp/wsh0.txt" "$tmp/wsh1.txt" | grep -c "seed-[23]") -eq \
   $(grep "seed-[23]" "$tmp/ws.txt" | sort -u | wc -l) && -s $tmp/wsh0.txt && -s $tmp/wsh1.txt ]] &&
  ok "widthseeds --shard: two disjoint halves of the single driver's seed runs" ||
  fail "widthseeds --shard: $both in both; $(wc -l "$tmp/wsh0.txt" "$tmp/wsh1.txt" "$tmp/ws.txt")"
# A diverged run reads as such in the report, not as a 27-digit loss.
DIVERGE=optimizer-adamw_lr-4e-3_seed-1 "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" \
  --out "$tmp/div" --iters 10 --stages lr,report >"$tmp/log" 2>&1 || fail "diverged: exit $?"
grep -q "0.004: diverged (8.8e+26)" "$tmp/div/ABLATION.md" && ! grep -q "[0-9]\{20\}" "$tmp/div/ABLATION.md" &&
  ok "a diverged run reads 'diverged (8.8e+26)' in the lr table" ||
  fail "diverged: $(grep '| AdamW |' "$tmp/div/ABLATION.md")"
# Stage nonorm runs AdamW and default Pion beside the best three even when both rank lower.
CALLS=$tmp/refs.txt WORSE="optimizer-adamw_,pion_momentum-lie_pion_update_side-both_pion_normalizer-adam" \
  "$py" "$src/scripts/ablation.py" --pion "$tmp/pion" --out "$tmp/refs" --iters 10 \
  --stages lr,seeds,nonorm,report >"$tmp/log" 2>&1 || fail "references: exit $?"
nonorm=$(grep norm-none "$tmp/refs.txt" | sed 's/_norm-none.*//' | sort -u)
n=$(grep -c . <<<"$nonorm")
[[ $n -eq 5 ]] && grep -qx "optimizer-adamw" <<<"$nonorm" &&
  grep -qx "optimizer-pion_init-spectral_pion_momentum-lie_pion_update_side-both_pion_normalizer-adam" <<<"$nonorm" &&
  grep -q "references" "$tmp/refs/ABLATION.md" &&
  ok "nonorm: the best three and the two references (AdamW, default Pion) ranked below them" ||
  fail "nonorm settings ($n): $nonorm"
run --stages lr,widthseedz
rc=$?
[[ $rc -eq 2 ]] && grep -q "unknown stage 'widthseedz'" "$tmp/log" && ok "--stages with a misspelt stage exits 2 naming it" ||
  fail "--stages lr,widthseedz gave exit $rc: $(tail -n 3 "$tmp/log")"
for bad in "--shard 2/2" "--shard x"; do
  # shellcheck disable=SC2086
  run $bad
  rc=$?
  [[ $rc -eq 2 ]] && grep -q -- "--shard" "$tmp/log" && ok "'$bad' exits 2 naming the flag" ||
    fail "'$bad' gave exit $rc: $(cat "$tmp/log")"
done

finish test_ablation
