#!/bin/bash
# Packages this session's sweeps into the repo's results/ (report + each cell's config/result).
set -e
cd /work/main
R=results/sweep-synth200k-2
rm -rf $R results/pruned-format-10x results/pep-fill-10x
mkdir -p $R results/pruned-format-10x results/pep-fill-10x
OMP_NUM_THREADS=1 .venv/bin/ctr sweep report /work/sweepdata/s3 /work/sweepdata/s3opt /work/sweepdata/s3pep --out $R/report > /dev/null
[ -d /work/sweepdata/s3new/cells ] && ls /work/sweepdata/s3new/cells/*/result.json >/dev/null 2>&1 && \
  OMP_NUM_THREADS=1 .venv/bin/ctr sweep report /work/sweepdata/s3new --out results/pruned-format-10x/report > /dev/null || true
OMP_NUM_THREADS=1 .venv/bin/ctr sweep report /work/sweepdata/s3fill --out results/pep-fill-10x/report > /dev/null || true
rm -f $R/report/results.parquet results/pruned-format-10x/report/results.parquet results/pep-fill-10x/report/results.parquet
for pair in "s3:$R" "s3opt:$R" "s3pep:$R" "s3new:results/pruned-format-10x" "s3fill:results/pep-fill-10x"; do
  src=/work/sweepdata/${pair%%:*}; dst=${pair#*:}
  for c in $src/cells/*/; do
    if [ -f $c/result.json ]; then
      n=$(basename $c); mkdir -p $dst/cells/$n
      cp $c/result.json $c/cell.json $dst/cells/$n/
    fi
  done
done
mkdir -p $R/specs
cp /work/sweepdata/s3_*.json /work/sweepdata/s3opt_*.json /work/sweepdata/s3new_*.json /work/sweepdata/s3_refusals*.json $R/specs/ 2>/dev/null || true
du -sh results
