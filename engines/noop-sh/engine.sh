#!/bin/sh
# CabinCrew noop engine in POSIX sh: the Python noop's behaviour without an interpreter
# start per launch (a few ms instead of ~35 ms of CPU). Changes nothing; writes one small
# evidence artifact ("noop" at flight-plan, "noop-take-off" at take-off) and one receipt.
# It reads the orchestrator's EngineInput only as far as it needs: the ids and the
# expected plan-token, matched strictly; anything it cannot find is invalid input (exit 2).
# Needs: sh, mkdir, sha256sum.
set -u
ENGINE_ID="cabincrew.noop-sh"
umask 022

mode=""
case "${1-}" in
    --mode) mode="${2-}" ;;
    --mode=*) mode="${1#--mode=}" ;;
esac

# One receipt on stdout, whatever happens; $1 exit code, $2 error code, $3 message.
fail() {
    m="$mode"
    case "$m" in flight-plan|take-off) ;; *) m="${CABINCREW_MODE:-flight-plan}" ;; esac
    case "$m" in flight-plan|take-off) ;; *) m="flight-plan" ;; esac
    echo "$ENGINE_ID: $3" >&2
    printf '{"artifacts": [], "diagnostics": {"error_code": "%s"}, "engine_id": "%s", "error": "%s", "metrics": [], "mode": "%s", "protocol_version": "1", "receipt_id": "rcpt-%s-%s", "status": "failure", "warnings": []}\n' \
        "$2" "$ENGINE_ID" "$3" "$m" "$m" "$2"
    exit "$1"
}

case "$mode" in
    flight-plan|take-off) ;;
    *) fail 2 invalid_arguments "usage: engine.sh --mode flight-plan|take-off" ;;
esac
if [ -n "${CABINCREW_MODE:-}" ] && [ "$CABINCREW_MODE" != "$mode" ]; then
    fail 2 invalid_environment "CABINCREW_MODE differs from --mode"
fi
for variable in CABINCREW_WORKSPACE CABINCREW_ARTIFACTS_DIR; do
    eval "value=\${$variable:-}"
    case "$value" in
        /*) [ -d "$value" ] || fail 2 invalid_environment "$variable is not a directory" ;;
        *) fail 2 invalid_environment "$variable must be an absolute path" ;;
    esac
done

# Builtins only from here to the hash: every fork costs as much as the work itself.
input=""
read_all() {
    line=""
    while IFS= read -r line; do input="$input$line
"; done
    input="$input$line"
}
if [ -n "${CABINCREW_INPUT_FILE:-}" ]; then
    [ -r "$CABINCREW_INPUT_FILE" ] || fail 2 invalid_input "cannot read the input file"
    read_all <"$CABINCREW_INPUT_FILE"
else
    read_all
fi
# A string field's value, accepted only when it is a plain identifier (nothing to unescape).
field() {
    case "$input" in
        *"\"$1\": \""*) ;;
        *) value=""; return ;;
    esac
    value=${input#*\"$1\": \"}
    value=${value%%\"*}
    case "$value" in
        "" | *[!A-Za-z0-9._:-]*) value="" ;;
    esac
}
case "$input" in
    *"\"mode\": \"$mode\""*) ;;
    *) fail 2 invalid_input "the input's mode is not $mode" ;;
esac
case "$input" in
    *'"protocol_version": "1"'*) ;;
    *) fail 2 invalid_input "protocol_version must be \"1\"" ;;
esac
field workflow_id
workflow_id=$value
field step_id
step_id=$value
[ -n "$workflow_id" ] && [ -n "$step_id" ] || fail 2 invalid_input "meta needs workflow_id and step_id"

name="noop"
token_field=""
if [ "$mode" = "take-off" ]; then
    name="noop-take-off"
    field expected_plan_token
    token=$value
    [ -n "$token" ] || fail 2 invalid_input "take-off needs expected_plan_token"
    token_field="\"plan_token\": \"$token\", "
fi

directory="$CABINCREW_ARTIFACTS_DIR/$name"
mkdir -- "$directory" 2>/dev/null || fail 1 artifact_conflict "artifact $name already exists"
# The same layout as the Python engines write (sorted keys, two-space indent).
nl='
'
document="{$nl  \"action\": \"none\",$nl  \"artifact_type\": \"noop\",$nl  \"body\": {$nl    \"engine_id\": \"$ENGINE_ID\",$nl    \"mode\": \"$mode\",$nl    \"step_id\": \"$step_id\",$nl    \"workflow_id\": \"$workflow_id\"$nl  },$nl  \"mime\": \"application/json\"$nl}"
set -C  # no clobbering: the file must be new
printf '%s\n' "$document" >"$directory/artifact.json" || fail 1 internal_error "cannot write the artifact"
set +C
size=$((${#document} + 1))  # ASCII only: the ids were checked above
sum=$(sha256sum <"$directory/artifact.json") || fail 1 internal_error "cannot hash the artifact"
hash=${sum%% *}

printf '{"artifacts": [{"hash": "%s", "name": "%s", "path": "%s", "role": "evidence", "size": %s}], "engine_id": "%s", "metrics": [], "mode": "%s", %s"protocol_version": "1", "receipt_id": "rcpt-%.32s", "status": "success", "warnings": []}\n' \
    "$hash" "$name" "$name" "$size" "$ENGINE_ID" "$mode" "$token_field" "$hash"
