#!/usr/bin/env bash
# Several anchors runs in a row, fulcrum's place in the case order rotating from run to run,
# and issue 10's ratios computed inside each run (never across runs), then their median and
# how many runs meet each target. One anchors run on this machine moves +-10 % between
# repetitions; this is the protocol that shows which side of a line a ratio sits on.
#   loadtest/campaign.sh                        # 4 runs, two threads then one, each run
#   RUNS=6 THREADS="2" loadtest/campaign.sh     # six two-thread runs
#   FULCRUM=/tmp/fulcrum-old loadtest/campaign.sh
#   REPORT_ONLY=1 OUT=/tmp/fulcrum-campaign.XXXX loadtest/campaign.sh   # the tables again
#   ROWS="results/a-rows.tsv results/b-rows.tsv" loadtest/campaign.sh   # several campaigns'
#       committed rows.tsv pooled (runs renamed tN-rK.cI, I the file's place), no new runs
# Each run is loadtest/anchors.sh (so ../shared/bench/anchors.sh, REPS=2 of 10 s by default)
# with CASES = nginx-wN haproxy-tN and fulcrum, rotated. Raw rows stay in $OUT/tN-rK/.
# Needs ../shared/bench/install.sh once (wrk, oha, nginx, haproxy). Loopback only.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-4}
THREADS=${THREADS:-"2 1"}
if [[ -n ${REPORT_ONLY:-}${ROWS:-} ]]; then
    RUNS=0
else
    build
fi
export FULCRUM
log "campaign: $RUNS run(s) per thread count ($THREADS), raw rows under $OUT"

for r in $(seq 1 "$RUNS"); do
    for t in $THREADS; do
        list=("nginx-w$t" "haproxy-t$t" custom)
        k=$(( (r - 1) % 3 ))
        cases="${list[*]:$k} ${list[*]:0:$k}"
        log "run $r, $t thread(s), order: $cases"
        OUT_DIR="$OUT/t$t-r$r" CASES="$cases" FULCRUM_THREADS=$t \
            "$ROOT/loadtest/anchors.sh" > "$OUT/t$t-r$r.log" 2>&1 \
            || { log "run $r t$t failed: $OUT/t$t-r$r.log"; tail -20 "$OUT/t$t-r$r.log" >&2; exit 1; }
    done
done

# Every run's raw rows in one file, the run first: this campaign's runs, or with ROWS the
# rows files of several (each run renamed tN-rK.cI when there is more than one file).
shopt -s nullglob
if [[ -n ${ROWS:-} ]]; then
    read -ra files <<< "$ROWS"
    { head -1 "${files[0]}"
      i=0
      for f in "${files[@]}"; do
          i=$((i + 1))
          tail -n +2 "$f" | awk -F'\t' -v OFS='\t' -v i="$i" -v n="${#files[@]}" \
              '{ if (n > 1) $1 = $1 ".c" i; print }'
      done; } > "$OUT/rows.tsv"
    THREADS=$(tail -n +2 "$OUT/rows.tsv" | cut -f1 | sed 's/-.*//; s/^t//' | sort -rn | uniq | tr '\n' ' ')
else
    runs=("$OUT"/t*-r*/results.tsv)
    [[ ${#runs[@]} -gt 0 ]] || { echo "no runs under $OUT (OUT= a campaign's directory)" >&2; exit 2; }
    { printf 'run\t'; head -1 "${runs[0]}"
      for f in "${runs[@]}"; do
          tail -n +2 "$f" | sed "s/^/$(basename "$(dirname "$f")")\t/"
      done; } > "$OUT/rows.tsv"
fi

# One line per run, tool and thread count: the mean over that run's repetitions of each case
# (cpu µs/req = mean cpu% / mean req/s, as anchors.sh computes it), then the ratios.
awk -F'\t' 'NR > 1 {
    t = $1; sub(/-.*/, "", t); sub(/^t/, "", t)
    c = ($3 == "haproxy-t" t ? "haproxy" : $3 == "nginx-w" t ? "nginx" : $3 ~ /^fulcrum/ ? "fulcrum" : "")
    if (c == "") next
    k = $1 SUBSEP $4 SUBSEP c; n[k]++; rps[k] += $5; cpu[k] += $9; cells[$1 SUBSEP $4] = 1
  }
  END {
    split("fulcrum haproxy nginx", cs, " ")
    for (cell in cells) {
      split(cell, rt, SUBSEP)
      ok = 1
      for (i in cs) { k = cell SUBSEP cs[i]; if (!(k in n)) ok = 0
        else { r[cs[i]] = rps[k] / n[k]; u[cs[i]] = (cpu[k] / n[k]) / 100 * 1e6 / r[cs[i]] } }
      if (!ok) continue
      printf "%s\t%s\t%.0f\t%.0f\t%.0f\t%.1f\t%.1f\t%.1f\t%.3f\t%.3f\t%.3f\t%.3f\n", rt[1], rt[2],
        r["fulcrum"], r["haproxy"], r["nginx"], u["fulcrum"], u["haproxy"], u["nginx"],
        u["fulcrum"] / u["haproxy"], r["fulcrum"] / r["haproxy"], r["fulcrum"] / r["nginx"],
        u["fulcrum"] / u["nginx"]
    }
  }' "$OUT/rows.tsv" | sort -t$'\t' -k1,1V -k2,2 > "$OUT/ratios.tsv"

echo "== per run: req/s and cpu µs/req (fulcrum / HAProxy / nginx), then the ratios =="
printf '%-7s %-4s %8s %8s %8s %7s %7s %7s %9s %9s %9s %9s\n' run tool f_rps h_rps n_rps \
    f_us h_us n_us cpu/hap thr/hap thr/ngx cpu/ngx
awk -F'\t' '{ printf "%-7s %-4s %8s %8s %8s %7s %7s %7s %9s %9s %9s %9s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 }' "$OUT/ratios.tsv"
echo
echo "== median per cell over the runs, runs meeting each target, 95 % interval of the median =="
printf '%-4s %-4s %32s %32s %32s\n' thr tool "cpu/HAProxy (<=1.0)" "thr/HAProxy (>=1.0)" "thr/nginx (>=1.1)"
for t in $THREADS; do
    for tool in wrk oha; do
        rows=$(awk -F'\t' -v t="t$t" -v tool="$tool" 'index($1, t "-") == 1 && $2 == tool' "$OUT/ratios.tsv")
        [[ -n $rows ]] || continue
        printf '%-4s %-4s %32s %32s %32s\n' "t$t" "$tool" "$(median_cell "$rows" 9 le 1.0)" \
            "$(median_cell "$rows" 10 ge 1.0)" "$(median_cell "$rows" 11 ge 1.1)"
    done
done
echo
echo "raw: $OUT/ratios.tsv, every row in $OUT/rows.tsv"
