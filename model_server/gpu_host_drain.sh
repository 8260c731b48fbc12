#!/usr/bin/env bash
# chipscale GPU host drain: hold Auto Scaling's termination of this instance (scale-in, an
# instance refresh, a replaced host) until TorchServe has no request in flight, or until
# CHIPSCALE_DRAIN_TIMEOUT seconds have passed, then complete the termination lifecycle hook
# (chipscale.names.LIFECYCLE_HOOK_TERMINATE) with CONTINUE.
#
# Auto Scaling first deregisters the instance from the load balancer's target group (no new
# request; up to the deregistration delay for those in flight), then holds it in
# Terminating:Wait, where CompleteLifecycleAction is accepted. The watcher sees the termination
# from its start (IMDS autoscaling/target-lifecycle-state turns Terminated), waits until no
# connection is open on the inference port, and completes the action, retrying while Auto
# Scaling has none to complete yet. The hook's timeout (default CONTINUE) ends a termination
# this script cannot complete. Its output goes to /var/log/chipscale/drain.log (the unit).
#
# Usage:
#   gpu_host_drain.sh watch   poll the target lifecycle state; drain once it is Terminated
#                             (chipscale-drain.service runs this)
#   gpu_host_drain.sh drain   drain and complete the hook now
#
# Environment (/etc/chipscale/drain.env, written by gpu_host_boot.sh):
#   CHIPSCALE_REGION          AWS region
#   CHIPSCALE_ASG_NAME        Auto Scaling group of this instance
#   CHIPSCALE_DRAIN_HOOK      the termination lifecycle hook
#   CHIPSCALE_DRAIN_TIMEOUT   most seconds to wait for requests in flight (the response timeout)
# Tuning (optional):
#   CHIPSCALE_DRAIN_POLL      seconds between polls (default 5)
#   CHIPSCALE_DRAIN_FLUSH     seconds left to the CloudWatch agent before completing (10)
#   CHIPSCALE_INFERENCE_PORT  TorchServe's inference port (default 8080)
set -euo pipefail
shopt -s inherit_errexit

# Overridable only so the tests can serve it on loopback.
readonly IMDS=${CHIPSCALE_IMDS_URL:-http://169.254.169.254/latest}
POLL=${CHIPSCALE_DRAIN_POLL:-5}
FLUSH=${CHIPSCALE_DRAIN_FLUSH:-10}
PORT=${CHIPSCALE_INFERENCE_PORT:-8080}

log() { printf '%s chipscale-drain: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

usage_error() {
  log "error: $*" >&2
  exit 2
}

check_env() {
  local name missing=()
  for name in CHIPSCALE_REGION CHIPSCALE_ASG_NAME CHIPSCALE_DRAIN_HOOK CHIPSCALE_DRAIN_TIMEOUT; do
    [[ -n ${!name:-} ]] || missing+=("$name")
  done
  ((${#missing[@]} == 0)) || usage_error "missing environment variable(s): ${missing[*]}"
  [[ $CHIPSCALE_DRAIN_TIMEOUT =~ ^[0-9]+$ ]] ||
    usage_error "CHIPSCALE_DRAIN_TIMEOUT must be whole seconds, got '$CHIPSCALE_DRAIN_TIMEOUT'"
  [[ $CHIPSCALE_DRAIN_HOOK =~ ^[A-Za-z0-9_./-]+$ ]] ||
    usage_error "CHIPSCALE_DRAIN_HOOK is not a lifecycle hook name: '$CHIPSCALE_DRAIN_HOOK'"
  [[ $PORT =~ ^[0-9]+$ ]] || usage_error "CHIPSCALE_INFERENCE_PORT must be a port number"
}

# IMDSv2 only (the launch template forbids v1): a session token, then the path.
imds() {
  local token
  token=$(curl -fsS --max-time 5 -X PUT "$IMDS/api/token" \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$IMDS/meta-data/$1"
}

# Connections open to TorchServe's inference port: the load balancer holds one for each request
# it waits on (and idle keep-alive ones, until it closes them at the end of deregistration).
in_flight() {
  local lines
  lines=$(ss -Htn state established "( sport = :$PORT )") || return 1
  grep -c . <<<"$lines" || true
}

complete() {
  local instance_id=$1 out
  if out=$(aws autoscaling complete-lifecycle-action --region "$CHIPSCALE_REGION" \
    --auto-scaling-group-name "$CHIPSCALE_ASG_NAME" \
    --lifecycle-hook-name "$CHIPSCALE_DRAIN_HOOK" \
    --instance-id "$instance_id" --lifecycle-action-result CONTINUE 2>&1); then
    log "lifecycle action $CHIPSCALE_DRAIN_HOOK completed with CONTINUE for $instance_id"
    return 0
  fi
  # Usually: the load balancer is still draining, so the instance is not in Terminating:Wait.
  log "not completed yet, retrying in ${POLL}s: $(tr '\n' ' ' <<<"$out")"
  return 1
}

# Wait until no connection is open on the inference port (or the timeout), then complete the
# hook, retrying until Auto Scaling accepts it. Completes only while drained or past the
# timeout, so a request the load balancer still holds is never cut by this script.
drain() {
  local instance_id count deadline flushed=false
  until instance_id=$(imds instance-id); do
    log "instance metadata unreadable, retrying in ${POLL}s"
    sleep "$POLL"
  done
  deadline=$(($(date +%s) + CHIPSCALE_DRAIN_TIMEOUT))
  log "termination of $instance_id: waiting up to ${CHIPSCALE_DRAIN_TIMEOUT}s for TorchServe's requests in flight (port $PORT)"
  while :; do
    count=$(in_flight) || count="an unknown number of"
    if [[ $count == 0 ]] || (($(date +%s) >= deadline)); then
      if [[ $flushed == false ]]; then
        if [[ $count == 0 ]]; then
          log "no request in flight: completing the termination"
        else
          log "still $count connection(s) open after ${CHIPSCALE_DRAIN_TIMEOUT}s: completing the termination anyway"
        fi
        sleep "$FLUSH" # this log reaches CloudWatch before the instance goes
        flushed=true
      fi
      complete "$instance_id" && return 0
    fi
    sleep "$POLL"
  done
}

watch() {
  local state
  log "watching for the termination of this instance ($CHIPSCALE_ASG_NAME, hook $CHIPSCALE_DRAIN_HOOK)"
  while :; do
    state=$(imds autoscaling/target-lifecycle-state 2>/dev/null) || state=""
    if [[ $state == Terminated ]]; then
      drain
      return 0
    fi
    sleep "$POLL"
  done
}

main() {
  case ${1:-} in
    watch | drain)
      check_env
      "$1"
      ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
    *) usage_error "unknown command '${1:-}' (expected: watch, drain)" ;;
  esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
