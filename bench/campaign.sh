#!/usr/bin/env bash
# Longer fault campaigns than CI runs: several seeds, both strategies, more
# faults each. Every campaign prints one summary line (seed, faults, requests,
# how long the journals took to drain, violations); a failure prints the
# violations, the key's history and the service's log, and the seed to run
# again.
#
#   bash bench/campaign.sh                 # seeds 1..10, 5 faults each
#   SEEDS=7 FAULTS=20 bash bench/campaign.sh
#   STRATEGIES=cache_first INSTANCES=2 bash bench/campaign.sh   # lists: 1,2
#   HYBRIDSTORE_CAMPAIGN_LOG_DIR=/tmp/logs HYBRIDSTORE_CAMPAIGN_LOG_LEVEL=info,hybridstore_engine=trace \
#     SEEDS=7 bash bench/campaign.sh      # a failure keeps every line each copy went through
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1,2,3,4,5,6,7,8,9,10}
FAULTS=${FAULTS:-5}
STRATEGIES=${STRATEGIES:-dual_write,cache_first}
INSTANCES=${INSTANCES:-1,2}
HYBRIDSTORE_CAMPAIGN_SEEDS=$SEEDS \
HYBRIDSTORE_CAMPAIGN_FAULTS=$FAULTS \
HYBRIDSTORE_CAMPAIGN_STRATEGIES=$STRATEGIES \
HYBRIDSTORE_CAMPAIGN_INSTANCES=$INSTANCES \
  cargo test --test load campaign -- --nocapture 2>&1 \
  | grep -E '^---.*written to|^campaign|^  availability|^  fault|^  Redis killed|^  read|^    [dh][0-9]+ |^  [dh][0-9]+:|^  [a-z].*(412|drain)|guarantees broken'
