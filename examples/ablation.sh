#!/usr/bin/env bash
# The design's ablation (README: Reproducing the ablation): five configurations, same data, same schedule, same seed.
# Usage: examples/ablation.sh PREPARED_DIR [RUNS_DIR] [extra cmdb train flags...]
#   examples/ablation.sh prepared/potsdam runs/ablation --epochs 100
set -euo pipefail
data=${1:?usage: ablation.sh PREPARED_DIR [RUNS_DIR] [flags...]}
runs=${2:-runs/ablation}
shift $(( $# >= 2 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
# design row             -> variant
#   CNN branch only      -> cnn_only
#   Mamba branch only    -> mamba_only
#   both, no fusion      -> no_fusion
#   both with fusion     -> no_boundary
#   full model           -> full
for variant in cnn_only mamba_only no_fusion no_boundary full; do
  cmdb train -c "$here/potsdam.yaml" --data "$data" --out "$runs/$variant" --variant "$variant" --seed 42 "$@"
  cmdb evaluate "$runs/$variant" --data "$data" --split test --ignore-clutter --json "$runs/$variant/test.json"
done
python - "$runs" <<'PY'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1])
print(f"{'variant':12s} {'mIoU':>6s} {'BIoU':>6s}")
for v in ["cnn_only", "mamba_only", "no_fusion", "no_boundary", "full"]:
    r = json.loads((runs / v / "test.json").read_text())
    print(f"{v:12s} {100 * r['mIoU']:6.2f} {100 * r['boundary_iou']:6.2f}")
PY
